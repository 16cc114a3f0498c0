"""Mirror a local run directory to its remote home in the background, without ever blocking training.

One *pass*: one remote listing, one local walk, decide per file, upload what changed in parallel, then
upload checkpoint manifests (only for folders whose data all made it), then apply remote retention.

Change detection (the part size-only tools get wrong): a file is skipped when its size and mtime equal
those recorded at its last upload *and* the remote still holds an object of that size. Otherwise, if
the sizes match, the content key of the local file (the S3 ETag computed locally, or sha256 for other
backends) decides; a same-size rewrite therefore uploads, and a checkpoint downloaded for a resume does
not. Content keys are cached by (size, mtime) so a file is hashed at most once per change.

The remote is any :class:`~runner.storage.base.Storage` (S3 through boto3, local, any other fsspec URL).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from runner.storage import StorageSettings, checksum
from runner.storage.base import Entry, RemoteUnreachable, Storage, StorageError, UploadCancelled

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CKPT_PREFIX = "checkpoints/"


class SyncError(StorageError):
    """The final sync did not reach the remote: the run's results are not safe there."""


class SyncConflict(SyncError):
    """The remote holds checkpoints of this run that the run never saw: uploading could overwrite them."""


# --------------------------------------------------------------------------- one pass
#: Files at least this big get a fast local fingerprint when uploaded (see ``_Seen.fingerprint``).
FINGERPRINT_MIN_BYTES = 1 << 20


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    #: Content key of this (size, mtime) version, once known.
    key: str | None = None
    #: xxh3 of the uploaded content (big files only), taken beside the upload and kept only if the file's
    #: size and mtime did not move from the walk until the upload finished. When the file is rewritten with
    #: the same size, a different fingerprint proves the content changed at a fraction of the cost of the
    #: content key (the S3 ETag is an MD5 pass, ~0.6 GB/s; xxh3 runs at memory speed).
    fingerprint: str | None = None


@dataclass
class PassResult:
    uploaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _is_unreachable(error: BaseException) -> bool:
    """Connection refused / timed out (the remote is down), as opposed to a problem with one file."""
    return isinstance(error, RemoteUnreachable | ConnectionError | TimeoutError)


def is_excluded(rel: str, patterns: list[str]) -> bool:
    """Never upload uncommitted work (``*.tmp`` folders, ``.part`` files) or what the user excluded."""
    parts = rel.split("/")
    if any(p.endswith(".tmp") for p in parts) or parts[-1].endswith(".part"):
        return True
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(parts[-1], pat) for pat in patterns)


def _checkpoint_of(rel: str) -> str | None:
    """``checkpoints/step_N`` for a file inside a checkpoint folder, else None."""
    if not rel.startswith(CKPT_PREFIX):
        return None
    parts = rel.split("/")
    return "/".join(parts[:2]) if len(parts) >= 3 else None


def _step(folder: str) -> int | None:
    name = folder.rsplit("/", 1)[-1]
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


class Syncer:
    """Mirrors ``local_dir`` to ``remote``; :meth:`start` runs passes every ``every_s`` on a thread.

    Remote retention: after a pass, checkpoints of this run beyond the newest ``keep_latest_k`` remote ones
    are deleted (manifest first, so a half-deleted checkpoint is never valid), except any step in
    ``protect`` and the newest remote checkpoint. "Of this run": uploaded by this syncer, or (with
    ``owner``, the run's config hash) written by an earlier process of the same run, as a requeued or
    restarted job finds them: their manifest names the same ``config_hash``. Anything else under the
    prefix (another run's checkpoints, a manifest that cannot be read) is left alone.
    """

    def __init__(
        self,
        local_dir: str,
        remote: Storage,
        every_s: float = 300.0,
        exclude: list[str] | None = None,
        keep_latest_k: int = 0,
        protect: set[int] | None = None,
        workers: int = 16,
        retries: int = 3,
        backoff_s: float = 0.5,
        warn_every_s: float = 30.0,
        owner: str | None = None,
    ) -> None:
        self.local_dir = os.path.abspath(local_dir)
        self.remote = remote
        self.url = remote.url()
        self.every_s = every_s
        self.exclude = list(exclude or [])
        self.keep_latest_k = keep_latest_k
        self.protect = set(protect or ())
        self.workers = workers
        self.retries = retries
        self.backoff_s = backoff_s
        self.warn_every_s = warn_every_s
        self._seen: dict[str, _Seen] = {}
        #: Content key of each file's latest hashed version: rel -> (size, mtime_ns, key).
        self._keys: dict[str, tuple[int, int, str]] = {}
        #: Same for fingerprints (see ``_Seen.fingerprint``).
        self._fingerprints: dict[str, tuple[int, int, str]] = {}
        self._written: set[int] = set()
        self.owner = owner
        #: Remote checkpoints not uploaded by this syncer: step -> written by this run (manifest read once).
        self._owned: dict[int, bool] = {}
        self._confirmed: set[int] = set()
        self._superseded: set[int] = set()
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = time.time()
        self._last_warn = 0.0
        self._silenced = 0
        self.failures = 0
        self.last: PassResult | None = None
        #: Set when an upload fails because the remote is unreachable (not for one bad file): the rest of
        #: the pass is not attempted, since an outage would otherwise cost retries x backoff per file.
        self._abort = threading.Event()
        #: Content checks that run beside uploads (one pool per pass).
        self._checks: ThreadPoolExecutor
        #: See :meth:`guard`: (step the run resumed from, or -1) while the remote has not been checked.
        self._guarded: int | None = None

    def guard(self, resumed_step: int | None) -> None:
        """The run could not look at the remote when it started (it was unreachable), so it may be training
        behind checkpoints that are there (say, a requeue onto a new machine during an outage). Upload
        nothing until a listing shows no checkpoint newer than ``resumed_step``; if there is one, every pass
        fails with :class:`SyncConflict` instead of overwriting it (and the run ends non-zero)."""
        self._guarded = -1 if resumed_step is None else resumed_step

    def _check_guard(self, listing: dict[str, Entry]) -> None:
        if self._guarded is None:
            return
        newer = sorted(
            s
            for rel in listing
            if rel.endswith("/" + MANIFEST) and (s := _step(_checkpoint_of(rel) or "")) is not None
            if s > self._guarded
        )
        if newer:
            started = "started fresh" if self._guarded < 0 else f"resumed from step {self._guarded}"
            raise SyncConflict(
                f"{self.url} holds checkpoints of this run up to step {newer[-1]} that it could not see "
                f"when it started (the remote was unreachable), so it {started}. Nothing is uploaded, so they "
                f"are not overwritten; this run's files stay in {self.local_dir}. Rerun the same command to "
                "resume from the remote's newest checkpoint, or pick another name=... to keep both"
            )
        log.info("%s is reachable and holds no newer checkpoint of this run: syncing", self.url)
        self._guarded = None

    # ----------------------------------------------------------------- status
    def confirmed(self, step: int) -> bool:
        """True once checkpoint ``step`` may go locally: it is on the remote (data and manifest), or it was
        superseded before it was uploaded and a newer checkpoint is on the remote."""
        with self._lock:
            if step in self._confirmed:
                return True
            return step in self._superseded and any(c > step for c in self._confirmed)

    def _superseded_steps(self, local: dict[str, os.stat_result], listing: dict[str, Entry]) -> set[int]:
        """Committed local checkpoints already beyond ``keep_latest_k`` and not on the remote yet.

        Uploading them would only feed remote retention: when passes fall behind fast checkpoints, the
        backlog (not the newest checkpoint) would decide how stale the remote is.
        """
        if self.keep_latest_k < 1:
            return set()
        committed = sorted(
            {
                s
                for rel in local
                if rel.endswith("/" + MANIFEST) and (s := _step(_checkpoint_of(rel) or "")) is not None
            },
            reverse=True,
        )
        return {
            s
            for s in committed[self.keep_latest_k :]
            if s not in self.protect and f"checkpoints/step_{s}/{MANIFEST}" not in listing
        }

    def metrics(self) -> dict[str, float]:
        """``sync/*`` scalars: lag since the last fully successful pass, last pass size and speed."""
        last = self.last or PassResult()
        return {
            "lag_s": time.time() - self._last_ok,
            "bytes": float(last.bytes),
            "files": float(len(last.uploaded)),
            "mb_per_s": last.bytes / last.seconds / 1e6 if last.seconds > 0 else 0.0,
            "failed_passes": float(self.failures),
        }

    # ----------------------------------------------------------------- one pass
    def _local_files(self) -> dict[str, os.stat_result]:
        out: dict[str, os.stat_result] = {}
        for folder, dirs, files in os.walk(self.local_dir):
            dirs[:] = [d for d in dirs if not d.endswith(".tmp")]
            for name in files:
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, self.local_dir).replace(os.sep, "/")
                if is_excluded(rel, self.exclude):
                    continue
                with contextlib.suppress(FileNotFoundError):  # Retention may delete it as we look.
                    out[rel] = os.stat(full)
        return out

    def _fingerprint(self, rel: str, st: os.stat_result) -> str:
        """xxh3 of the file's current content, cached by (size, mtime) like content keys."""
        cached = self._fingerprints.get(rel)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        value = checksum.of_file(os.path.join(self.local_dir, rel), "xxh3_128")
        self._fingerprints[rel] = (st.st_size, st.st_mtime_ns, value)
        return value

    def _key(self, rel: str, st: os.stat_result) -> str:
        cached = self._keys.get(rel)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        key = self.remote.content_key(os.path.join(self.local_dir, rel))
        self._keys[rel] = (st.st_size, st.st_mtime_ns, key)
        return key

    def _needs_upload(self, rel: str, st: os.stat_result, there: Entry | None) -> bool | str:
        """True, False, or the remote content key to compare with once this file is hashed."""
        if there is None or there.size != st.st_size:
            return True
        seen = self._seen.get(rel)
        if seen is not None and (seen.size, seen.mtime_ns) == (st.st_size, st.st_mtime_ns):
            if seen.key is None and there.key is not None:
                seen.key = there.key  # Uploaded by us from this exact version: the listing names its key.
            # A different remote key means someone replaced the object: put ours back.
            return not (seen.key is None or there.key is None or seen.key == there.key)
        # Same size, different or unknown version: the content decides (hashed by the upload worker).
        remote_key = self._remote_key(rel, there)
        return True if remote_key is None else remote_key

    def _remote_key(self, rel: str, there: Entry) -> str | None:
        """The content key of the remote object: listed (S3 ETag), or recorded when we uploaded it."""
        seen = self._seen.get(rel)
        return there.key if there.key is not None else (seen.key if seen is not None else None)

    def _holds(self, rel: str, st: os.stat_result, remote_key: Callable[[], str | None], eager: bool) -> bool:
        """True if the remote holds this version's content. ``eager``: hash before ``remote_key()`` returns
        (it may wait for the listing), because the answer is likely needed."""
        seen = self._seen.get(rel)
        if st.st_size >= FINGERPRINT_MIN_BYTES:
            fingerprint = self._fingerprint(rel, st)  # Also what the upload records, if this one goes up.
            if seen is not None and seen.fingerprint is not None and fingerprint != seen.fingerprint:
                return False  # Not what this syncer uploaded last, so not what the remote holds (from us).
            # Unknown, or what we uploaded (a touch, a copy back): the remote's content key has the last word.
        key = self._key(rel, st) if eager else None
        want = remote_key()
        return want is not None and (key or self._key(rel, st)) == want

    def _changed_since_upload(self, local: dict[str, os.stat_result]) -> list[str]:
        """Files this syncer uploaded that changed locally since (checkpoint manifests aside: they go last).

        They go up whatever the remote listing says, unless their content turns out to be what the remote
        holds, so their uploads start before the listing is back.
        """
        return [
            rel
            for rel, st in local.items()
            if not (_checkpoint_of(rel) and rel.endswith("/" + MANIFEST))
            and (seen := self._seen.get(rel)) is not None
            and (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns)
        ]

    def _upload(
        self,
        rel: str,
        st: os.stat_result,
        progress: Callable[[int], None] | None,
        holds: Callable[[], bool] | None = None,
    ) -> str | bool | None:
        """Upload one file with retries; returns an error message, None on success (or if it vanished), or
        False when the remote already holds this content.

        ``holds()`` (does the remote hold this content? a hash, maybe a wait for the pass's listing) runs
        *while* the file uploads; if it says yes the upload is cancelled. Verifying a same-size rewrite by
        its content therefore costs no time when the content did change.
        """
        full = os.path.join(self.local_dir, rel)
        if self._abort.is_set():
            return f"{rel}: not attempted (an earlier upload of this pass failed)"
        same: Future[bool] | None = None
        cancel = threading.Event()
        if holds is not None:
            same = self._checks.submit(holds)

            def cancel_if_held(f: Future[bool]) -> None:
                if f.exception() is None and f.result():
                    cancel.set()

            same.add_done_callback(cancel_if_held)
        # The fingerprint of what goes up is taken beside the upload (by the content check, if there is one),
        # and kept only if the file did not change from the walk until the upload finished.
        fingerprinted: Future[Any] | None = same
        if same is None and st.st_size >= FINGERPRINT_MIN_BYTES:
            fingerprinted = self._checks.submit(self._fingerprint, rel, st)
        error, unreachable = "", False
        for attempt in range(self.retries):
            try:
                key = None if self.remote.lists_content_keys else self._key(rel, st)
                self.remote.put(full, rel, progress, cancel)
                error = ""
                break
            except UploadCancelled:
                break
            except FileNotFoundError:
                if not os.path.exists(full):
                    return None  # Deleted locally (retention) after the walk: nothing to mirror.
                error = f"{rel}: not found on the remote side"
            except Exception as e:
                error = f"{rel}: {type(e).__name__}: {e}"
                unreachable = _is_unreachable(e)
            if cancel.is_set():
                break
            if attempt + 1 < self.retries and not self._stopping.is_set():
                time.sleep(self.backoff_s * 2**attempt)
        if same is not None:
            try:
                if same.result():  # The remote holds this content: nothing was (or needed to be) uploaded.
                    self._seen[rel] = _Seen(st.st_size, st.st_mtime_ns, self._keys[rel][2])
                    return False
            except FileNotFoundError:
                return None  # Deleted locally (retention) after the walk: nothing to mirror.
            except Exception as e:  # The listing failed: the pass reports that.
                error = error or f"{rel}: {type(e).__name__}: {e}"
        if not error:
            self._seen[rel] = _Seen(st.st_size, st.st_mtime_ns, key, self._uploaded_fingerprint(rel, st, fingerprinted))
            return None
        if unreachable:
            self._abort.set()
        return error

    def _uploaded_fingerprint(self, rel: str, st: os.stat_result, taken: Future[Any] | None) -> str | None:
        if taken is None:
            return None
        with contextlib.suppress(Exception):  # No fingerprint is fine: the content key decides then.
            taken.result()
            now = os.stat(os.path.join(self.local_dir, rel))
            cached = self._fingerprints.get(rel)
            if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns) == (now.st_size, now.st_mtime_ns):
                return cached[2]
        return None

    def sync_once(self, progress: bool = False) -> PassResult:
        """One full pass (blocking). Errors are returned in ``PassResult.failed``, except a failed listing."""
        with self._pass_lock:
            return self._pass(progress)

    def _pass(self, progress: bool) -> PassResult:
        started = time.perf_counter()
        result = PassResult()
        self._abort.clear()
        bar = None
        lock = threading.Lock()

        def tick(n: int) -> None:
            if bar is not None:
                with lock:
                    bar.update(n)

        # NOTE: the listing (a round trip, or many pages) is in flight while this thread walks the local
        # tree and files already known to have changed start uploading; everything else waits for it.
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-list") as lister,
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="sync-hash") as self._checks,
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sync") as pool,
        ):
            listed = lister.submit(self.remote.listing)
            local = self._local_files()
            early = {rel: local[rel] for rel in self._changed_since_upload(local)}
            if progress:
                from tqdm import tqdm

                bar = tqdm(unit="B", unit_scale=True, desc="final sync", dynamic_ncols=True)
                bar.total = sum(st.st_size for st in early.values())

            def listed_key(rel: str) -> str | None:
                there = listed.result().get(rel)
                return None if there is None or there.size != local[rel].st_size else self._remote_key(rel, there)

            futures: dict[Future[str | bool | None], tuple[str, os.stat_result]] = {}
            for rel, st in sorted(early.items(), key=lambda item: -item[1].st_size):
                # A same-size rewrite is hashed at once; a file that grew only if the remote has its new size.
                eager = self._seen[rel].size == st.st_size
                holds = functools.partial(self._holds, rel, st, functools.partial(listed_key, rel), eager)
                futures[pool.submit(self._upload, rel, st, tick, holds)] = (rel, st)
            try:
                listing = listed.result()
                self._check_guard(listing)
            except BaseException:
                self._abort.set()  # Queued uploads are not attempted; the failed listing is the error.
                raise
            try:
                superseded = self._superseded_steps(local, listing)
                with self._lock:
                    self._superseded |= superseded
                local = {rel: st for rel, st in local.items() if _step(_checkpoint_of(rel) or "") not in superseded}
                checks = {
                    rel: self._needs_upload(rel, st, listing.get(rel)) for rel, st in local.items() if rel not in early
                }
                todo = {rel: st for rel, st in local.items() if checks.get(rel, False) is not False}
                manifests = {
                    rel: st for rel, st in todo.items() if _checkpoint_of(rel) and rel.endswith("/" + MANIFEST)
                }
                data = {rel: st for rel, st in todo.items() if rel not in manifests}
                if bar is not None:
                    bar.total += sum(st.st_size for st in todo.values())
                    bar.refresh()

                def submit(files: dict[str, os.stat_result]) -> None:
                    # Largest first: big checkpoint shards start early and small files fill the gaps.
                    for rel, st in sorted(files.items(), key=lambda item: -item[1].st_size):
                        key = checks[rel]
                        # Same size, unknown version: its content decides, hashed while it uploads.
                        holds = None
                        if isinstance(key, str):
                            holds = functools.partial(self._holds, rel, st, functools.partial(str, key), True)
                        futures[pool.submit(self._upload, rel, st, tick, holds)] = (rel, st)

                submit(data)
                self._collect(futures, result, tick)
                # NOTE: a manifest goes up only once every file of its folder is there: it is what makes a
                # remote checkpoint valid, so it must never be visible before its data.
                broken = {_checkpoint_of(rel) for rel in result.failed}
                ready = {rel: st for rel, st in manifests.items() if _checkpoint_of(rel) not in broken}
                for rel in manifests.keys() - ready.keys():
                    result.failed[rel] = "held back: a data file of this checkpoint failed to upload"
                futures = {}
                submit(ready)
                self._collect(futures, result, tick)
            finally:
                if bar is not None:
                    bar.close()

        failed_folders = {_checkpoint_of(rel) for rel in result.failed}
        uploaded = set(result.uploaded)
        with self._lock:
            for rel in local:
                folder = _checkpoint_of(rel)
                if folder and rel.endswith("/" + MANIFEST) and folder not in failed_folders:
                    step = _step(folder)
                    if step is not None:
                        self._confirmed.add(step)
                        if rel in uploaded:
                            self._written.add(step)
        if result.ok:
            self._retain(listing, local, result)
        result.seconds = time.perf_counter() - started
        self.last = result
        return result

    @staticmethod
    def _collect(
        futures: dict[Future[str | bool | None], tuple[str, os.stat_result]],
        result: PassResult,
        tick: Callable[[int], None],
    ) -> None:
        for fut in as_completed(futures):
            rel, st = futures[fut]
            outcome = fut.result()
            if outcome is None:
                result.uploaded.append(rel)
                result.bytes += st.st_size
            elif outcome is False:
                tick(st.st_size)  # Already there: the progress bar counts it as done.
            else:
                result.failed[rel] = str(outcome)

    def _retain(self, listing: dict[str, Entry], local: dict[str, os.stat_result], result: PassResult) -> None:
        if self.keep_latest_k < 1:
            return
        present = set(listing) | set(result.uploaded)
        manifests = [_checkpoint_of(rel) or "" for rel in present if rel.endswith("/" + MANIFEST)]
        valid = sorted({s for folder in manifests if (s := _step(folder)) is not None}, reverse=True)
        if not valid:
            return
        keep = set(valid[: self.keep_latest_k]) | self.protect | {valid[0]}
        for step in sorted(s for s in valid if s not in keep):
            folder = f"checkpoints/step_{step}"
            files = sorted(rel for rel in present if rel.startswith(folder + "/"))
            try:
                if not self._of_this_run(step):
                    continue
                # Manifest first: from that moment the remote copy is no longer a checkpoint.
                for rel in sorted(files, key=lambda r: not r.endswith("/" + MANIFEST)):
                    self.remote.delete(rel)
            except Exception as e:
                result.failed[folder] = f"retention of old remote checkpoint {folder} failed: {e}"
                continue
            with self._lock:
                self._written.discard(step)
            self._owned.pop(step, None)
            result.deleted.append(folder)
            log.info("retention: deleted remote checkpoint %s/%s", self.url, folder)

    def _of_this_run(self, step: int) -> bool:
        with self._lock:
            if step in self._written:
                return True
        if self.owner is None:
            return False
        if step not in self._owned:
            rel = f"checkpoints/step_{step}/{MANIFEST}"
            try:
                manifest = json.loads(self.remote.read_bytes(rel))
                self._owned[step] = isinstance(manifest, dict) and manifest.get("config_hash") == self.owner
            except ValueError:
                self._owned[step] = False  # Not a manifest we can read: not ours to delete.
            # NOTE: any other error (the remote went away) propagates: _retain reports it in the pass result,
            # and the next pass asks again.
        return self._owned[step]

    # ----------------------------------------------------------------- background
    def _report(self, result: PassResult | None, error: str = "") -> None:
        if result is not None and result.ok:
            if self.failures:
                log.warning("sync to %s recovered after %d failed passes", self.url, self.failures)
            self.failures, self._silenced = 0, 0
            self._last_ok = time.time()
            if result.uploaded:
                log.info(
                    "synced %d files (%.1f MB) to %s in %.1fs",
                    len(result.uploaded),
                    result.bytes / 1e6,
                    self.url,
                    result.seconds,
                )
            return
        self.failures += 1
        if not error and result is not None:
            first = sorted(result.failed.items())[:3]
            error = f"{len(result.failed)} files failed, e.g. " + "; ".join(msg for _, msg in first)
        now = time.monotonic()
        if now - self._last_warn < self.warn_every_s:
            self._silenced += 1
            return
        more = f" ({self._silenced} more failed passes not shown)" if self._silenced else ""
        self._last_warn, self._silenced = now, 0
        log.warning(
            "SYNC FAILED (attempt %d): the remote %s is behind by %.0fs; training continues on local disk and "
            "the sync retries every %gs. Cause: %s%s",
            self.failures,
            self.url,
            time.time() - self._last_ok,
            self.every_s,
            error,
            more,
        )

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.every_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._report(self.sync_once())
            except Exception as e:  # The background thread must survive anything the remote does.
                self._report(None, f"{type(e).__name__}: {e}")

    def start(self) -> None:
        log.info("syncing %s to %s every %.0fs", self.local_dir, self.url, self.every_s)
        self._thread = threading.Thread(target=self._loop, name="runner-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def final_sync(self, attempts: int = 4) -> PassResult:
        """Blocking sync with a progress bar (end of run, preemption). Raises :class:`SyncError` on failure."""
        self.stop()
        self._stopping.clear()  # Let per-file retries back off normally from here on.
        error = ""
        for attempt in range(attempts):
            try:
                result = self.sync_once(progress=True)
                if result.ok:
                    self._report(result)
                    return result
                error = "; ".join(f"{msg}" for _, msg in sorted(result.failed.items())[:5])
            except SyncConflict:
                raise  # Retrying cannot help: the user has to choose.
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            if attempt + 1 < attempts:
                log.warning("final sync to %s failed (try %d/%d): %s", self.url, attempt + 1, attempts, error)
                time.sleep(self.backoff_s * 4**attempt)
        raise SyncError(
            f"final sync of {self.local_dir} to {self.url} failed after {attempts} attempts: {error}. "
            "The local run directory is complete; copy it once the remote is reachable (re-running the same "
            "command resumes and syncs)."
        )


def finish(syncer: Syncer | None, failed: bool, on_done: Callable[[], object] = lambda: None) -> None:
    """End of run: stop the background thread and run the final blocking sync.

    After a successful run a failed final sync raises :class:`SyncError` (the process must exit non-zero).
    If the run itself failed, the final sync still runs (to save what can be saved) but its failure is
    only logged, so the user sees the original exception. ``on_done`` runs after a successful final sync
    (local retention of checkpoints that are now confirmed remote).
    """
    if syncer is None:
        return
    try:
        syncer.final_sync()
    except Exception as e:
        if not failed:
            raise
        log.error("%s", e)
        return
    on_done()


def for_run(
    plugin: StorageSettings,
    name: str,
    run_dir: str,
    keep_latest_k: int,
    protect: set[int] | None = None,
    owner: str | None = None,
) -> Syncer | None:
    """The syncer for run ``name`` per ``storage.*`` (``plugin`` is the run's StorageSettings), or None if
    local-only. ``owner``: the run's config hash, as its checkpoint manifests record it (see :class:`Syncer`)."""
    remote = plugin.remote(name, fail_fast=True)
    if remote is None:
        return None
    return Syncer(run_dir, remote, plugin.sync_every_s, plugin.exclude, keep_latest_k, protect, owner=owner)
