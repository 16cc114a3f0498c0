"""When and how checkpoints are written, verified, found and retired.

Layout: ``<run>/checkpoints/step_<N>/`` holds the DCP files, one ``rank_<r>.json`` per rank and
``manifest.json``. The manifest is written last; a folder without a valid manifest (or whose files do not
match its sizes and checksums) is not a checkpoint. Locally a checkpoint is written into
``step_<N>.tmp/`` and renamed into place after an fsync, so a crash leaves the old newest checkpoint or
the new one, never a torn one.

Loading never unpickles arbitrary objects: DCP's ``.metadata`` is read with an allow-list unpickler,
tensor data with ``weights_only=True``, and a checkpoint with pickled non-tensor entries is refused.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import platform
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from runner import distributed
from runner.async_save import AsyncSaver
from runner.hashing import HashingWriter
from runner.reading import (
    CheckpointError,
    CorruptCheckpoint,
    OnePassReader,
    SafeLoadPlanner,
    SafeReader,
    UnsafeCheckpointError,
)
from runner.state import Payload, TrainState
from runner.storage import checksum
from runner.storage.base import Storage
from runner.storage.local import LocalStorage, atomic_write, fsync_dir

log = logging.getLogger(__name__)

FORMAT = "runner-checkpoint/1"
MANIFEST = "manifest.json"
CKPT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
#: Files hashed at once when verifying a checkpoint.
VERIFY_THREADS = 4
_T = TypeVar("_T")


def step_dir(step: int) -> str:
    return f"step_{step}"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.json"


# --------------------------------------------------------------------------- verification
@dataclass(frozen=True)
class CheckpointRef:
    step: int
    #: Storage holding the checkpoint folder, and the folder's path inside it.
    storage: Storage
    path: str
    manifest: dict[str, Any]
    #: Where it came from, if this is a local copy of a remote checkpoint (see :func:`fetch`).
    origin: str = ""

    @property
    def url(self) -> str:
        return self.storage.url(self.path)

    @property
    def source(self) -> str:
        """Where the checkpoint came from, for messages: the remote URL of a downloaded copy."""
        return self.origin or self.url


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def verify(storage: Storage, path: str, checksums: bool = True) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") if the checkpoint at ``path`` is complete and intact, else (None, reason).

    ``checksums=False`` checks the structure only (manifest, file names and sizes): for a remote checkpoint
    that is about to be downloaded, whose bytes are checked once, in the local copy (:func:`fetch`).
    """
    if not storage.exists(_join(path, MANIFEST)):
        return None, f"no {MANIFEST} (incomplete or not a checkpoint)"
    try:
        manifest = json.loads(storage.read_bytes(_join(path, MANIFEST)))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("unknown format")
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{MANIFEST} is malformed ({e})"
    folder = _STEP_DIR.match(path.rsplit("/", 1)[-1])
    if folder and int(folder.group(1)) != step:
        return None, f"{MANIFEST} says step {step} but the folder is {path}"
    for name, info in sorted(files.items()):
        if "/" in name or name.startswith(".."):
            return None, f"{MANIFEST} names an unsafe path {name!r}"
        target = _join(path, name)
        if not storage.exists(target):
            return None, f"{name} is missing"
        if storage.size(target) != int(info["size"]):
            return None, f"{name} has {storage.size(target)} bytes, manifest says {info['size']}"
    if ".metadata" not in files or rank_file(0) not in files:
        return None, f"{MANIFEST} lists no .metadata or {rank_file(0)}"
    if not checksums:
        return manifest, ""
    # Checksums last (they read every byte), one file per thread: hashlib and file reads release the GIL,
    # so the data files (one per DCP writer thread) are hashed side by side.
    names = sorted(files)
    try:
        algorithms = {name: checksum.algorithm_of(str(files[name]["checksum"])) for name in names}
    except checksum.UnknownChecksum as e:
        return None, f"{MANIFEST} has {e} (written by a newer runner?)"
    with ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, len(names)), thread_name_prefix="verify") as pool:
        sums = list(pool.map(lambda name: storage.checksum(_join(path, name), algorithms[name]), names))
    for name, digest in zip(names, sums, strict=True):
        if digest != files[name]["checksum"]:
            return None, f"{name} fails its checksum"
    return manifest, ""


def list_steps(storage: Storage) -> list[int]:
    steps = [int(m.group(1)) for name in storage.list(CKPT_DIR) if (m := _STEP_DIR.match(name))]
    return sorted(steps, reverse=True)


def valid_refs(storage: Storage, checksums: bool = True, newer_than: int = -1) -> Iterator[CheckpointRef]:
    """Checkpoints newer than ``newer_than`` that verify, newest first; each one skipped is named in a
    warning with the reason. ``checksums=False``: see :func:`verify`."""
    for step in list_steps(storage):
        if step <= newer_than:
            return
        path = f"{CKPT_DIR}/{step_dir(step)}"
        manifest, reason = verify(storage, path, checksums)
        if manifest is not None:
            yield CheckpointRef(step, storage, path, manifest)
        else:
            log.warning("skipping checkpoint %s: %s", storage.url(path), reason)


def newest_valid(storage: Storage) -> CheckpointRef | None:
    """Newest checkpoint that verifies; each one skipped is named in a warning with the reason."""
    return next(valid_refs(storage), None)


def ref_at(storage: Storage, path: str, checksums: bool = True) -> CheckpointRef:
    """An explicitly named checkpoint (``trainer.resume=<path>``): invalid is an error, not a skip."""
    if not storage.exists(path):
        raise CheckpointError(
            f"trainer.resume={storage.url(path)}: no such checkpoint (nothing at that path); name a step_<N> "
            "folder of a run's checkpoints, or use trainer.resume=auto"
        )
    manifest, reason = verify(storage, path, checksums)
    if manifest is None:
        raise CheckpointError(f"trainer.resume={storage.url(path)} is not a valid checkpoint: {reason}")
    return CheckpointRef(int(manifest["step"]), storage, path, manifest)


def fetch(ref: CheckpointRef, folder: str) -> CheckpointRef:
    """A verified local copy of remote checkpoint ``ref`` in ``folder`` (the run's checkpoints folder).

    Collective when distributed: local rank 0 of each node downloads and verifies (ranks on a node share
    its disk), the others wait; a failure anywhere raises on every rank: :class:`CorruptCheckpoint` if a
    downloaded copy does not match its manifest, :class:`CheckpointError` if the download failed.
    """
    local_dir = os.path.join(folder, step_dir(ref.step))
    error, corrupt = None, False
    if distributed.local_rank() == 0:
        log.info("downloading checkpoint %s to %s", ref.url, local_dir)
        try:
            download(ref, local_dir)
        except CorruptCheckpoint as e:
            error, corrupt = str(e), True
        except Exception as e:
            error = f"could not download {ref.url}: {_one_line(e)}"
    error = distributed.first_error(error)
    corrupt = distributed.any_true(corrupt)
    if error is not None:
        raise (CorruptCheckpoint if corrupt else CheckpointError)(error)
    with open(os.path.join(local_dir, MANIFEST), "rb") as f:
        manifest = json.load(f)  # The copy's own (verified) manifest: the remote may have moved on since.
    parent, _, name = local_dir.rpartition(os.sep)
    return CheckpointRef(ref.step, LocalStorage(parent), name, manifest, origin=ref.url)


# --------------------------------------------------------------------------- save / load
def clean_partial(folder: str) -> None:
    """Remove ``*.tmp`` folders left in ``folder`` by a crash mid-save (rank 0 only, before loading)."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        committed = name.removesuffix(".old.tmp")
        if name.endswith(".old.tmp") and not os.path.exists(os.path.join(folder, committed)):
            # NOTE: a crash between the two renames of a same-step re-save (see _commit): the old
            # checkpoint is the committed one; put it back rather than lose it.
            log.warning("restoring checkpoint %s set aside by an interrupted re-save", committed)
            os.replace(os.path.join(folder, name), os.path.join(folder, committed))
        elif name.endswith(".tmp"):
            log.warning("removing partial checkpoint %s left by an interrupted save", os.path.join(folder, name))
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _versions() -> dict[str, str]:
    from runner import __version__

    return {"runner": __version__, "torch": torch.__version__, "python": platform.python_version()}


class Checkpointer:
    """Saves ``TrainState`` into the local run directory and applies the retention policy there."""

    def __init__(
        self,
        run_dir: str,
        keep_latest_k: int,
        config_hash: str,
        writer_threads: int = 2,
        uploaded: Callable[[int], bool] | None = None,
    ) -> None:
        self.local = LocalStorage(run_dir)
        self.keep_latest_k = keep_latest_k
        #: With a remote: True once a step is confirmed there; until then retention keeps the local copy.
        self.uploaded = uploaded
        self.config_hash = config_hash
        self.writer_threads = writer_threads
        self.folder = self.local.url(CKPT_DIR)
        self._async: AsyncSaver | None = None

    # ----------------------------------------------------------------------- sync or async dispatch
    def enable_async(self, in_flight: str = "wait", pin: bool = False, defer_copy: bool = False) -> None:
        """From now on :meth:`save` snapshots and returns; the write and commit run in the background.

        With ``defer_copy`` even the copy of weights and optimizer state moves to the worker, and the caller
        must call :meth:`fence` before its next optimizer step (the training loop does, via its hooks).
        """
        self._async = AsyncSaver(self.write, self.folder_of, in_flight=in_flight, pin=pin, defer_copy=defer_copy)

    def fence(self) -> None:
        """Before an optimizer step: wait until an async save has copied what the step will change."""
        if self._async is not None:
            self._async.fence()

    def save(self, state: Payload, block: bool = False) -> str:
        """Checkpoint ``state``: in the background if async is on, unless ``block`` (final save, preemption).

        Returns the checkpoint's folder ("" if skipped under ``trainer.ckpt_in_flight=skip``). With
        ``block`` (or synchronously) it is committed when this returns.
        """
        if self._async is None:
            return self.write(state)
        return self._async.save(state, block=block)

    def check(self) -> None:
        """Raise a failed background save on the calling (training) thread; a no-op when synchronous."""
        if self._async is not None:
            self._async.check()

    def wait(self) -> None:
        """Block until the save in flight, if any, is committed (re-raising its failure)."""
        if self._async is not None:
            self._async.wait()

    def close(self) -> None:
        """Wait for the last save and stop the background worker."""
        if self._async is not None:
            saver, self._async = self._async, None
            saver.close()

    @property
    def last_stall_s(self) -> float:
        """Seconds the training thread lost to the last async save: the call itself and the next fence."""
        return self._async.last_stall_s + self._async.last_fence_s if self._async is not None else 0.0

    def folder_of(self, step: int) -> str:
        return os.path.join(self.folder, step_dir(step))

    def clean_partial(self) -> None:
        clean_partial(self.folder)

    def write(self, state: Payload) -> str:
        """Write, verify sizes/checksums into the manifest, and commit by rename. Returns the folder.

        Every rank calls this. The save runs in three phases (prepare, DCP write, commit) and the ranks
        agree on the outcome after each one (``distributed.first_error``), so a failure on any rank raises
        the same ``CheckpointError`` on every rank: no rank is left waiting in a collective its peers
        abandoned. Inside the write phase DCP's own coordinator does the same for errors in its planners
        and storage writers.
        """
        step = state.step
        final = os.path.join(self.folder, step_dir(step))
        tmp = f"{final}.tmp"
        rank, world = distributed.rank(), distributed.world_size()
        started = time.perf_counter()

        def prepare() -> tuple[dict[str, Any], dict[str, Any]]:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            distributed.barrier()
            return state.tensors_and_meta()

        tensors, meta = self._agreed(step, tmp, prepare)

        def write() -> None:
            atomic_write(os.path.join(tmp, rank_file(rank)), json.dumps(meta).encode())
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                warnings.filterwarnings("ignore", message=".*process group.*")
                dcp.save(tensors, storage_writer=writer)

        writer = HashingWriter(tmp, thread_count=self.writer_threads, sync_files=True)
        self._agreed(step, tmp, write)

        def commit() -> None:
            if rank == 0:
                self._commit(tmp, final, step, world, known=writer.checksum)

        self._agreed(step, tmp, commit)
        log.info("saved checkpoint %s (%.2fs)", final, time.perf_counter() - started)
        if rank == 0:
            self.retire()
        return final

    def _agreed(self, step: int, tmp: str, phase: Callable[[], _T]) -> _T:
        """Run one save phase on this rank, then raise on every rank if it failed on any."""
        result: _T | None = None
        try:
            result = phase()
            error = None
        # NOTE: DCP's CheckpointException derives from BaseException, not Exception. Errors are surfaced
        # on every rank below, so no rank waits forever.
        except (Exception, CheckpointException) as e:
            error = _one_line(e)
            log.error("checkpoint save at step %d failed on this rank: %s", step, error)
        error = distributed.first_error(error)
        if error is not None:
            if distributed.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"saving checkpoint at step {step} failed: {error}")
        return result  # type: ignore[return-value]

    def _commit(
        self, tmp: str, final: str, step: int, world: int, known: Callable[[str], str | None] = lambda p: None
    ) -> None:
        """Manifest (sizes, checksums; ``known`` gives those hashed while written), then the rename."""
        files = {}
        for name in sorted(os.listdir(tmp)):
            full = os.path.join(tmp, name)
            digest = known(full) or checksum.of_file(full, checksum.MANIFEST_ALGORITHM)
            files[name] = {"size": os.path.getsize(full), "checksum": digest}
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": world,
            # DDP keeps identical weights on every rank: the tensors load at any world size.
            "replicated": True,
            "config_hash": self.config_hash,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        atomic_write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
        if os.path.exists(final):  # NOTE: a re-save of the same step (resume=none); keep old until new is in.
            old = f"{final}.old.tmp"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.folder)

    def retire(self, protect: set[int] | None = None) -> list[int]:
        """Delete all but the newest ``keep_latest_k`` committed checkpoints (never one in ``protect``)."""
        committed = [s for s in list_steps(self.local) if self.local.exists(f"{CKPT_DIR}/{step_dir(s)}/{MANIFEST}")]
        doomed = [s for s in committed[self.keep_latest_k :] if s not in (protect or set())]
        if self.uploaded is not None:
            waiting = [s for s in doomed if not self.uploaded(s)]
            if waiting:
                log.debug("keeping old checkpoints %s locally until they are confirmed uploaded", waiting)
            doomed = [s for s in doomed if s not in waiting]
        for s in doomed:
            # Rename first, so a crash mid-delete leaves a *.tmp folder (cleaned at the next start), never
            # a half-deleted step_<N> that still looks committed.
            doomed_dir = os.path.join(self.folder, f"{step_dir(s)}.retired.tmp")
            os.replace(os.path.join(self.folder, step_dir(s)), doomed_dir)
            shutil.rmtree(doomed_dir, ignore_errors=True)
        return doomed


def _one_line(error: BaseException) -> str:
    """``OSError: [Errno 28] No space left on device`` rather than DCP's multi-line report of it.

    NOTE: torch's zip writer turns a failed write into ``RuntimeError: unexpected pos``; the OS error that
    says what to fix is further down the chain (and, with DCP, inside ``CheckpointException.failures``).
    """
    roots: list[BaseException] = [error]
    if isinstance(error, CheckpointException):
        roots += [f[0] if isinstance(f, tuple) else f for f in error.failures.values()]
    for root in roots:
        seen: BaseException | None = root
        for _ in range(20):  # a chain, not a cycle
            if seen is None:
                break
            if isinstance(seen, OSError) and seen.errno is not None:
                return f"{type(seen).__name__}: [Errno {seen.errno}] {seen.strerror}"
            seen = seen.__cause__ or seen.__context__
    text = f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def load(ref: CheckpointRef, state: TrainState, scratch: str) -> None:
    """Load ``ref`` into ``state`` in place (downloading it into ``scratch`` first if it is remote), checking
    every file this rank reads against the manifest as it reads it (:class:`~runner.reading.OnePassReader`).

    Raises :class:`CorruptCheckpoint` (on every rank) if a file fails its checksum: ``state`` is then partly
    overwritten and must be loaded again from another checkpoint, or rebuilt (see :mod:`runner.resume`).
    """
    if not isinstance(ref.storage, LocalStorage):
        ref = fetch(ref, scratch)
    local_dir = ref.url
    rank, world = distributed.rank(), distributed.world_size()
    name = rank_file(rank) if rank_file(rank) in ref.manifest["files"] else rank_file(0)
    saved_world = int(ref.manifest.get("world_size", 1))
    if saved_world != world and rank == 0:
        log.warning(
            "checkpoint %s was saved by %d ranks and loads into %d: weights and optimizer state are exact, the "
            "data position is rank 0's for every rank (this epoch's sample order differs from an uninterrupted "
            "run)",
            ref.source,
            saved_world,
            world,
        )
    reader = OnePassReader(local_dir, ref.manifest["files"])
    dest = state.load_destination()
    error = None
    try:
        with open(os.path.join(local_dir, name), "rb") as f:
            data = f.read()
        reader.check_bytes(name, data)
        meta = json.loads(data)
        check_tensor_layout(reader.read_metadata(), dest, ref.url)
    except CorruptCheckpoint as e:
        error = str(e)
    # NOTE: agreed before DCP's collectives, so a rank that found a bad file does not leave the others
    # waiting in dcp.load; a bad file found inside dcp.load is raised on every rank by DCP itself.
    error = distributed.first_error(error)
    if error is not None:
        raise CorruptCheckpoint(error)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=".*process group.*")
        try:
            dcp.load(dest, storage_reader=reader, planner=SafeLoadPlanner())
        except CheckpointException as e:  # NOTE: a BaseException; turn it into one of ours
            causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
            corrupt = next((c for c in causes if isinstance(c, CorruptCheckpoint)), None)
            if corrupt is not None:
                raise CorruptCheckpoint(str(corrupt)) from None
            if any(isinstance(c, pickle.UnpicklingError) for c in causes):
                raise UnsafeCheckpointError(
                    f"{ref.url} holds tensor data that is not a plain tensor (refused by weights_only "
                    "loading): it was not written by runner; refusing to unpickle it"
                ) from None
            unsafe = next((c for c in causes if isinstance(c, UnsafeCheckpointError)), None)
            if unsafe is not None:
                raise UnsafeCheckpointError(str(unsafe)) from None
            raise CheckpointError(f"loading {ref.url} failed: {_one_line(e)}") from None
    state.restore(dest, meta)


def check_tensor_layout(metadata: Any, dest: dict[str, Any], where: str) -> None:
    """Before DCP reads anything: every entry we load must be stored as a tensor of the same shape.

    Besides catching a model/config mismatch with a readable message, this refuses checkpoints that
    store a pickled object where a tensor belongs (DCP would unpickle it with ``weights_only=False``).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = metadata.state_dict_metadata
    for top, section in dest.items():
        for key, tensor in section.items():
            fqn = f"{top}.{key}"
            meta = stored.get(fqn)
            if meta is None:
                raise CheckpointError(f"{where} has no {fqn!r}: was it saved from a different model or optimizer?")
            if not isinstance(meta, TensorStorageMetadata):
                raise UnsafeCheckpointError(
                    f"{where} stores a pickled object at {fqn!r} where a tensor belongs: refusing to unpickle it"
                )
            if tuple(meta.size) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{where}: {fqn!r} has shape {tuple(meta.size)}, the model has {tuple(tensor.shape)}; "
                    "the checkpoint is from a different model configuration"
                )


def download(ref: CheckpointRef, local_dir: str) -> None:
    """Fetch a remote checkpoint into ``local_dir`` (atomically: ``.tmp`` then rename) and re-verify it."""
    if os.path.isdir(local_dir) and verify(LocalStorage(local_dir), "")[0] is not None:
        return
    # A name of its own: nodes that share a file system may download the same checkpoint at once.
    tmp = f"{local_dir}.{socket.gethostname()}-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ref.manifest["files"]:
        ref.storage.get(f"{ref.path}/{name}", os.path.join(tmp, name))
    ref.storage.get(f"{ref.path}/{MANIFEST}", os.path.join(tmp, MANIFEST))
    manifest, reason = verify(LocalStorage(tmp), "")
    if manifest is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorruptCheckpoint(f"{reason} (in the downloaded copy)")
    os.makedirs(os.path.dirname(local_dir), exist_ok=True)
    if os.path.isdir(local_dir):
        if verify(LocalStorage(local_dir), "")[0] is not None:  # another node got there first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(local_dir, ignore_errors=True)
    os.replace(tmp, local_dir)


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint folder by its flattened key (for tests, reports, export)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = SafeReader(path)
    metadata = reader.read_metadata()
    dest = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(dest, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
    return dest
