"""Mirror a local run directory to its remote home in the background, without ever blocking training.

One *pass*: one remote listing, in flight while the local tree is walked and files known to have changed
start uploading; then what changed (:mod:`.diff` decides) uploads in parallel, largest first; then the
checkpoint manifests, only for folders whose data all made it; then remote retention (:mod:`.retention`).
A thread runs a pass every ``every_s``; failed passes are reported as rate-limited ``SYNC FAILED``
warnings, and the run ends with a final blocking sync (:func:`finish`). Content keys and fingerprints are
cached by (size, mtime), so a file is hashed at most once per change.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from runner.checkpoint.layout import folder_of, is_partial, manifest_step, step_of
from runner.storage import StorageSettings, checksum
from runner.storage.base import Entry, Progress, RemoteUnreachable, Storage, StorageError, UploadCancelled
from runner.sync import diff
from runner.sync.diff import FINGERPRINT_MIN_BYTES, Uploaded, Version
from runner.sync.retention import RemoteRetention

log = logging.getLogger(__name__)


class SyncError(StorageError):
    """The final sync did not reach the remote: the run's results are not safe there."""


class SyncConflict(SyncError):
    """The remote holds checkpoints of this run that the run never saw: uploading could overwrite them."""


@dataclass(frozen=True)
class SyncSettings:
    """The syncer's tunables."""

    #: Seconds between background passes (``storage.sync_every``).
    every_s: float = 300.0
    #: Glob patterns never uploaded (``storage.exclude``); uncommitted work never is either.
    exclude: list[str] = field(default_factory=list)
    #: Remote checkpoints of this run to keep (``trainer.keep_latest_k``; 0 = all), see :mod:`.retention`.
    keep_latest_k: int = 0
    #: Files uploaded at once.
    workers: int = 16
    #: Tries per file in a pass, ``backoff_s`` apart, doubling.
    retries: int = 3
    backoff_s: float = 0.5
    #: At most one ``SYNC FAILED`` warning this often.
    warn_every_s: float = 30.0


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


class Outcome(enum.Enum):
    UPLOADED = "uploaded"
    #: The remote already held this content: nothing was (or needed to be) uploaded.
    HELD = "held"
    #: Deleted locally (by retention) after the walk: nothing to mirror.
    VANISHED = "vanished"
    FAILED = "failed"


class UploadResult(NamedTuple):
    outcome: Outcome
    error: str = ""


@dataclass(frozen=True)
class _Job:
    rel: str
    version: Version
    #: Does the remote already hold this content? Asked beside the upload (it hashes, and may wait for the
    #: pass's listing); a yes cancels the upload.
    holds: Callable[[], bool] | None = None


def _is_unreachable(error: BaseException) -> bool:
    """The remote is down (as opposed to a problem with one file)."""
    return isinstance(error, RemoteUnreachable | ConnectionError | TimeoutError)


class _Hashes:
    """Content keys and xxh3 fingerprints of local files, cached by version: each is computed once per change."""

    def __init__(self, local_dir: str, content_key: Callable[[str], str]) -> None:
        self.local_dir = local_dir
        self._content_key = content_key
        self._keys: dict[str, tuple[Version, str]] = {}
        self._fingerprints: dict[str, tuple[Version, str]] = {}

    def key(self, rel: str, version: Version) -> str:
        return self._cached(self._keys, rel, version, self._content_key)

    def fingerprint(self, rel: str, version: Version) -> str:
        return self._cached(self._fingerprints, rel, version, lambda path: checksum.of_file(path, "xxh3_128"))

    def known_fingerprint(self, rel: str, version: Version) -> str | None:
        cached = self._fingerprints.get(rel)
        return cached[1] if cached is not None and cached[0] == version else None

    def _cached(
        self, cache: dict[str, tuple[Version, str]], rel: str, version: Version, compute: Callable[[str], str]
    ) -> str:
        cached = cache.get(rel)
        if cached is not None and cached[0] == version:
            return cached[1]
        value = compute(os.path.join(self.local_dir, rel))
        cache[rel] = (version, value)
        return value


class _Bar:
    """The final sync's progress bar (a no-op for background passes), fed from the upload threads."""

    def __init__(self, enabled: bool) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(unit="B", unit_scale=True, desc="final sync", dynamic_ncols=True)

    def add(self, total: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.total = (self._bar.total or 0) + total
                self._bar.refresh()

    def tick(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Uploads:
    """The uploads of one pass in flight, largest first (big checkpoint shards start early and small files
    fill the gaps), and their collection into the pass result."""

    def __init__(self, pool: ThreadPoolExecutor, upload: Callable[[_Job, Progress], UploadResult], bar: _Bar) -> None:
        self.pool, self.upload, self.bar = pool, upload, bar
        self.futures: dict[Future[UploadResult], _Job] = {}

    def submit(self, jobs: Iterable[_Job]) -> None:
        for job in sorted(jobs, key=lambda job: -job.version.size):
            self.bar.add(job.version.size)
            self.futures[self.pool.submit(self.upload, job, self.bar.tick)] = job

    def collect(self, result: PassResult) -> None:
        for future in as_completed(self.futures):
            job, done = self.futures[future], future.result()
            if done.outcome is Outcome.UPLOADED:
                result.uploaded.append(job.rel)
                result.bytes += job.version.size
            elif done.outcome is Outcome.FAILED:
                result.failed[job.rel] = done.error
            else:
                self.bar.tick(job.version.size)  # Nothing to send: the progress bar counts it as done.
        self.futures = {}


class _Health:
    """How the syncer is doing: lag since the last good pass, failures, and the rate-limited warnings."""

    def __init__(self, url: str, settings: SyncSettings) -> None:
        self.url, self.settings = url, settings
        self.last_ok = time.time()
        self.failures = 0
        self._last_warn = 0.0
        self._silenced = 0

    def report(self, result: PassResult | None, error: str = "") -> None:
        if result is not None and result.ok:
            if self.failures:
                log.warning("sync to %s recovered after %d failed passes", self.url, self.failures)
            self.failures, self._silenced = 0, 0
            self.last_ok = time.time()
            if result.uploaded:
                mb = result.bytes / 1e6
                log.info("synced %d files (%.1f MB) to %s in %.1fs", len(result.uploaded), mb, self.url, result.seconds)
            return
        self.failures += 1
        if not error and result is not None:
            first = sorted(result.failed.items())[:3]
            error = f"{len(result.failed)} files failed, e.g. " + "; ".join(msg for _, msg in first)
        now = time.monotonic()
        if now - self._last_warn < self.settings.warn_every_s:
            self._silenced += 1
            return
        more = f" ({self._silenced} more failed passes not shown)" if self._silenced else ""
        self._last_warn, self._silenced = now, 0
        log.warning(
            "SYNC FAILED (attempt %d): the remote %s is behind by %.0fs; training continues on local disk and "
            "the sync retries every %gs. Cause: %s%s",
            self.failures,
            self.url,
            time.time() - self.last_ok,
            self.settings.every_s,
            error,
            more,
        )


class Syncer:
    """Mirrors ``local_dir`` to ``remote``; :meth:`start` runs passes every ``settings.every_s`` on a thread.

    ``protect``: checkpoint steps remote retention never deletes (the one the run resumed from); ``owner``:
    the run's config hash, by which retention recognises checkpoints an earlier process of the run wrote.
    """

    def __init__(
        self,
        local_dir: str,
        remote: Storage,
        settings: SyncSettings | None = None,
        protect: set[int] | None = None,
        owner: str | None = None,
    ) -> None:
        self.local_dir = os.path.abspath(local_dir)
        self.remote = remote
        self.url = remote.url()
        self.settings = settings or SyncSettings()
        #: What this syncer uploaded, by run-relative path.
        self._seen: dict[str, Uploaded] = {}
        self._hashes = _Hashes(self.local_dir, lambda path: self.remote.content_key(path))
        self._retention = RemoteRetention(remote, self.settings.keep_latest_k, protect, owner)
        self._health = _Health(self.url, self.settings)
        self.last: PassResult | None = None
        # Checkpoint steps the remote holds, and those skipped as already beyond keep_latest_k (see confirmed()).
        self._lock = threading.Lock()
        self._confirmed: set[int] = set()
        self._superseded: set[int] = set()
        #: See :meth:`guard`: (step the run resumed from, or -1) while the remote has not been checked.
        self._guarded: int | None = None
        # One pass at a time; within a pass, an unreachable remote stops the uploads not yet started (an
        # outage would otherwise cost retries x backoff per file); content checks run on their own pool.
        self._pass_lock = threading.Lock()
        self._abort = threading.Event()
        self._checks: ThreadPoolExecutor
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def failures(self) -> int:
        """Failed passes in a row."""
        return self._health.failures

    def guard(self, resumed_step: int | None) -> None:
        """The run could not look at the remote when it started (it was unreachable), so it may be training
        behind checkpoints that are there (say, a requeue onto a new machine during an outage). Upload
        nothing until a listing shows no checkpoint newer than ``resumed_step``; if there is one, every pass
        fails with :class:`SyncConflict` instead of overwriting it (and the run ends non-zero)."""
        self._guarded = -1 if resumed_step is None else resumed_step

    def _check_guard(self, listing: dict[str, Entry]) -> None:
        if self._guarded is None:
            return
        newer = sorted(s for rel in listing if (s := manifest_step(rel)) is not None and s > self._guarded)
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

    def metrics(self) -> dict[str, float]:
        """``sync/*`` scalars: lag since the last fully successful pass, last pass size and speed."""
        last = self.last or PassResult()
        return {
            "lag_s": time.time() - self._health.last_ok,
            "bytes": float(last.bytes),
            "files": float(len(last.uploaded)),
            "mb_per_s": last.bytes / last.seconds / 1e6 if last.seconds > 0 else 0.0,
            "failed_passes": float(self._health.failures),
        }

    # ----------------------------------------------------------------- one pass
    def sync_once(self, progress: bool = False) -> PassResult:
        """One full pass (blocking). Errors are returned in ``PassResult.failed``, except a failed listing."""
        with self._pass_lock:
            return self._pass(progress)

    def _pass(self, progress: bool) -> PassResult:
        started = time.perf_counter()
        result = PassResult()
        self._abort.clear()
        bar = _Bar(progress)
        try:
            with (
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-list") as lister,
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="sync-hash") as self._checks,
                ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="sync") as pool,
            ):
                # NOTE: the listing (a round trip, or many pages) is in flight while this thread walks the
                # local tree and files already known to have changed start uploading.
                listed = lister.submit(self.remote.listing)
                local = self._local_files()
                uploads = _Uploads(pool, self._upload, bar)
                early = self._early_jobs(local, listed)
                uploads.submit(early)
                listing = self._listing(listed)
                local = self._without_superseded(local, listing)
                self._upload_changed(local, {job.rel for job in early}, listing, uploads, result)
        finally:
            bar.close()
        self._confirm(local, result)
        if result.ok:
            deleted, failed = self._retention.apply(set(listing) | set(result.uploaded))
            result.deleted += deleted
            result.failed.update(failed)
        result.seconds = time.perf_counter() - started
        self.last = result
        return result

    def _local_files(self) -> dict[str, Version]:
        out: dict[str, Version] = {}
        for folder, dirs, files in os.walk(self.local_dir):
            dirs[:] = [d for d in dirs if not is_partial(d)]
            for name in files:
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, self.local_dir).replace(os.sep, "/")
                if diff.excluded(rel, self.settings.exclude):
                    continue
                with contextlib.suppress(FileNotFoundError):  # Retention may delete it as we look.
                    st = os.stat(full)
                    out[rel] = Version(st.st_size, st.st_mtime_ns)
        return out

    def _early_jobs(self, local: dict[str, Version], listed: Future[dict[str, Entry]]) -> list[_Job]:
        """Uploads that start before the listing is back (:func:`.diff.changed_since_upload`)."""
        jobs = []
        for rel in diff.changed_since_upload(local, self._seen):
            version = local[rel]
            remote_key = functools.partial(self._listed_key, listed, rel, version)
            # A same-size rewrite is hashed at once; a file that grew only if the remote has its new size.
            eager = self._seen[rel].version.size == version.size
            jobs.append(_Job(rel, version, functools.partial(self._holds, rel, version, remote_key, eager)))
        return jobs

    def _listed_key(self, listed: Future[dict[str, Entry]], rel: str, version: Version) -> str | None:
        """The remote's content key of ``rel`` once the listing is back; None without an object of this size."""
        there = listed.result().get(rel)
        if there is None or there.size != version.size:
            return None
        return diff.remote_key(there, self._seen.get(rel))

    def _listing(self, listed: Future[dict[str, Entry]]) -> dict[str, Entry]:
        try:
            listing = listed.result()
            self._check_guard(listing)
        except BaseException:
            self._abort.set()  # Queued uploads are not attempted; the failed listing is the error.
            raise
        return listing

    def _without_superseded(self, local: dict[str, Version], listing: dict[str, Entry]) -> dict[str, Version]:
        superseded = self._retention.superseded(local, listing)
        with self._lock:
            self._superseded |= superseded
        return {rel: v for rel, v in local.items() if step_of(folder_of(rel) or "") not in superseded}

    def _upload_changed(
        self,
        local: dict[str, Version],
        started: set[str],
        listing: dict[str, Entry],
        uploads: _Uploads,
        result: PassResult,
    ) -> None:
        """Upload what :func:`.diff.plan` says (beyond the uploads ``started`` early): data, then manifests."""
        diff.learn_keys(self._seen, local, listing)
        todo = diff.plan({rel: v for rel, v in local.items() if rel not in started}, listing, self._seen)
        jobs = {rel: self._job(rel, local[rel], verdict) for rel, verdict in todo.items()}
        manifests = {rel for rel in jobs if manifest_step(rel) is not None}
        uploads.submit(job for rel, job in jobs.items() if rel not in manifests)
        uploads.collect(result)
        # NOTE: a manifest goes up only once every file of its folder is there (see diff.held_back).
        held = diff.held_back(manifests, result.failed)
        for rel in held:
            result.failed[rel] = "held back: a data file of this checkpoint failed to upload"
        uploads.submit(jobs[rel] for rel in manifests - held)
        uploads.collect(result)

    def _job(self, rel: str, version: Version, verdict: diff.Verdict) -> _Job:
        key = verdict.unless_key
        if key is None:
            return _Job(rel, version)
        # Same size, unknown version: its content decides, hashed while it uploads.
        return _Job(rel, version, functools.partial(self._holds, rel, version, lambda: key, True))

    def _confirm(self, local: dict[str, Version], result: PassResult) -> None:
        confirmed = diff.confirmed_steps(local, result.failed)
        with self._lock:
            self._confirmed |= confirmed
        uploaded = (manifest_step(rel) for rel in result.uploaded)
        self._retention.written |= {step for step in uploaded if step is not None and step in confirmed}

    # ----------------------------------------------------------------- one file
    def _holds(self, rel: str, version: Version, remote_key: Callable[[], str | None], eager: bool) -> bool:
        """True if the remote holds this version's content. ``eager``: hash before ``remote_key()`` returns
        (it may wait for the listing), because the answer is likely needed."""
        done = self._seen.get(rel)
        if version.size >= FINGERPRINT_MIN_BYTES:
            fingerprint = self._hashes.fingerprint(rel, version)  # Also what the upload records, if it goes up.
            if done is not None and done.fingerprint is not None and fingerprint != done.fingerprint:
                return False  # Not what this syncer uploaded last, so not what the remote holds (from us).
            # Unknown, or what we uploaded (a touch, a copy back): the remote's content key has the last word.
        key = self._hashes.key(rel, version) if eager else None
        want = remote_key()
        return want is not None and (key or self._hashes.key(rel, version)) == want

    def _upload(self, job: _Job, progress: Progress) -> UploadResult:
        """Upload one file with retries, unless the remote turns out to hold its content already.

        ``job.holds()`` runs *while* the file uploads; if it says yes the upload is cancelled. Verifying a
        same-size rewrite by its content therefore costs no time when the content did change.
        """
        if self._abort.is_set():
            return UploadResult(Outcome.FAILED, f"{job.rel}: not attempted (an earlier upload of this pass failed)")
        cancel = threading.Event()
        check = self._check_beside(job, cancel)
        # The fingerprint of what goes up is taken beside the upload (by the content check, if there is one).
        fingerprinted = check if check is not None else self._fingerprint_beside(job)
        sent, key, unreachable = self._send(job, progress, cancel)
        if sent.outcome is Outcome.VANISHED:
            return sent
        if check is not None:
            try:
                if check.result():
                    self._seen[job.rel] = Uploaded(job.version, self._hashes.key(job.rel, job.version))
                    return UploadResult(Outcome.HELD)
            except FileNotFoundError:
                return UploadResult(Outcome.VANISHED)
            except Exception as e:  # The listing failed: the pass reports that.
                if sent.outcome is Outcome.UPLOADED:
                    sent = UploadResult(Outcome.FAILED, f"{job.rel}: {type(e).__name__}: {e}")
        if sent.outcome is Outcome.UPLOADED:
            self._seen[job.rel] = Uploaded(job.version, key, self._uploaded_fingerprint(job, fingerprinted))
        elif sent.outcome is Outcome.FAILED and unreachable:
            self._abort.set()
        return sent

    def _check_beside(self, job: _Job, cancel: threading.Event) -> Future[bool] | None:
        if job.holds is None:
            return None
        check = self._checks.submit(job.holds)

        def cancel_if_held(f: Future[bool]) -> None:
            if f.exception() is None and f.result():
                cancel.set()

        check.add_done_callback(cancel_if_held)
        return check

    def _fingerprint_beside(self, job: _Job) -> Future[Any] | None:
        if job.version.size < FINGERPRINT_MIN_BYTES:
            return None
        return self._checks.submit(self._hashes.fingerprint, job.rel, job.version)

    def _send(self, job: _Job, progress: Progress, cancel: threading.Event) -> tuple[UploadResult, str | None, bool]:
        """The upload itself, with retries: (result, the content key to record, whether the remote is down)."""
        full = os.path.join(self.local_dir, job.rel)
        error, key, unreachable = "", None, False
        for attempt in range(self.settings.retries):
            try:
                key = None if self.remote.lists_content_keys else self._hashes.key(job.rel, job.version)
                self.remote.put(full, job.rel, progress, cancel)
                return UploadResult(Outcome.UPLOADED), key, False
            except UploadCancelled:  # The content check found the remote holds this content.
                return UploadResult(Outcome.HELD), None, False
            except FileNotFoundError:
                if not os.path.exists(full):
                    return UploadResult(Outcome.VANISHED), None, False
                error = f"{job.rel}: not found on the remote side"
            except Exception as e:
                error, unreachable = f"{job.rel}: {type(e).__name__}: {e}", _is_unreachable(e)
            if cancel.is_set():
                break
            if attempt + 1 < self.settings.retries and not self._stopping.is_set():
                time.sleep(self.settings.backoff_s * 2**attempt)
        return UploadResult(Outcome.FAILED, error), key, unreachable

    def _uploaded_fingerprint(self, job: _Job, taken: Future[Any] | None) -> str | None:
        """The fingerprint taken beside the upload, if the file did not change from the walk until now."""
        if taken is None:
            return None
        with contextlib.suppress(Exception):  # No fingerprint is fine: the content key decides then.
            taken.result()
            now = os.stat(os.path.join(self.local_dir, job.rel))
            if Version(now.st_size, now.st_mtime_ns) == job.version:
                return self._hashes.known_fingerprint(job.rel, job.version)
        return None

    # ----------------------------------------------------------------- background
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.settings.every_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._health.report(self.sync_once())
            except Exception as e:  # The background thread must survive anything the remote does.
                self._health.report(None, f"{type(e).__name__}: {e}")

    def start(self) -> None:
        log.info("syncing %s to %s every %.0fs", self.local_dir, self.url, self.settings.every_s)
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
                    self._health.report(result)
                    return result
                error = "; ".join(f"{msg}" for _, msg in sorted(result.failed.items())[:5])
            except SyncConflict:
                raise  # Retrying cannot help: the user has to choose.
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            if attempt + 1 < attempts:
                log.warning("final sync to %s failed (try %d/%d): %s", self.url, attempt + 1, attempts, error)
                time.sleep(self.settings.backoff_s * 4**attempt)
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
    storage: StorageSettings,
    name: str,
    run_dir: str,
    keep_latest_k: int,
    protect: set[int] | None = None,
    owner: str | None = None,
) -> Syncer | None:
    """The syncer of run ``name`` per ``storage.*``, or None if the run is local-only. ``owner``: the run's
    config hash, as its checkpoint manifests record it (see :mod:`.retention`)."""
    remote = storage.remote(name, fail_fast=True)
    if remote is None:
        return None
    settings = SyncSettings(every_s=storage.sync_every_s, exclude=list(storage.exclude), keep_latest_k=keep_latest_k)
    return Syncer(run_dir, remote, settings, protect, owner)
