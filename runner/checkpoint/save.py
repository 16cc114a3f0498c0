"""Writing a checkpoint: every rank's share through DCP, the manifest last, then a rename.

A save runs in three phases (prepare, DCP write, commit) and the ranks agree on the outcome after each one
(``distributed.first_error``), so a failure on any rank raises the same :class:`CheckpointError` on every
rank: no rank is left waiting in a collective its peers abandoned. Inside the write phase DCP's own
coordinator does the same for errors in its planners and storage writers. Locally the checkpoint is written
into ``step_<N>.tmp/``, fsynced, given its manifest and renamed into place, so a crash leaves the previous
checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from runner import distributed
from runner.checkpoint import manifest, retention
from runner.checkpoint.async_save import AsyncSaver
from runner.checkpoint.errors import CheckpointError, one_line
from runner.checkpoint.hashing import HashingWriter
from runner.checkpoint.layout import CKPT_DIR, MANIFEST, PARTIAL, rank_file, step_dir
from runner.checkpoint.state import Payload
from runner.storage.local import atomic_write, fsync_dir

log = logging.getLogger("runner.checkpoint")

_T = TypeVar("_T")

#: DCP writer threads per rank: two files written side by side keep the disk busy while one is hashed.
WRITER_THREADS = 2


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


class Checkpointer:
    """Saves ``TrainState`` into the local run directory and applies the retention policy there."""

    def __init__(
        self,
        run_dir: str,
        keep_latest_k: int,
        config_hash: str,
        uploaded: Callable[[int], bool] | None = None,
        replicated: bool = True,
        group: Any = None,
    ) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.keep_latest_k = keep_latest_k
        #: With a remote: True once a step is confirmed there; until then retention keeps the local copy.
        self.uploaded = uploaded
        self.config_hash = config_hash
        #: Every rank holds the whole model (DDP), as opposed to a shard of it (FSDP): the manifest says so.
        self.replicated = replicated
        self.folder = os.path.join(self.run_dir, CKPT_DIR)
        #: The process group of a save's collectives (None: the default group). Background saves need one of
        #: their own (``distributed.side_group``): from the writer thread, collectives on the default group
        #: would interleave with the training thread's, in a different order on each rank.
        self.group = group
        self._async: AsyncSaver | None = None

    # ----------------------------------------------------------------------- sync or async dispatch
    def enable_async(self, in_flight: str = "wait", pin: bool = False, defer_copy: bool = False) -> None:
        """From now on :meth:`save` snapshots and returns; the write and commit run in the background.

        With ``defer_copy`` even the copy of weights and optimizer state moves to the worker, and the caller
        must call :meth:`fence` before its next optimizer step (the training loop does, via its hooks).
        """
        if distributed.world_size() > 1 and self.group is None:
            raise ValueError("async checkpoints with several ranks need a process group of their own (group=)")
        agree = distributed.first_error if distributed.world_size() > 1 else None
        self._async = AsyncSaver(
            self.write, self.folder_of, in_flight=in_flight, pin=pin, defer_copy=defer_copy, agree=agree
        )

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
        tmp = f"{final}{PARTIAL}"
        rank, world = distributed.rank(), distributed.world_size()
        started = time.perf_counter()

        def prepare() -> tuple[dict[str, Any], dict[str, Any]]:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            distributed.barrier(self.group)
            return state.tensors_and_meta()

        tensors, meta = self._agreed(step, tmp, prepare)

        def write() -> None:
            atomic_write(os.path.join(tmp, rank_file(rank)), json.dumps(meta).encode())
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                warnings.filterwarnings("ignore", message=".*process group.*")
                dcp.save(tensors, storage_writer=writer, process_group=self.group)

        writer = HashingWriter(tmp, thread_count=WRITER_THREADS, sync_files=True)
        self._agreed(step, tmp, write)

        def commit() -> None:
            # Each rank hashed its own files while writing them; rank 0 gets every checksum, not every byte.
            known = distributed.merged(writer.checksums(), self.group)
            if rank == 0:
                self._commit(tmp, final, step, world, known=known.get)

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
            error = one_line(e)
            log.error("checkpoint save at step %d failed on this rank: %s", step, error)
        error = distributed.first_error(error, self.group)
        if error is not None:
            if distributed.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"saving checkpoint at step {step} failed: {error}")
        return result  # type: ignore[return-value]

    def _commit(
        self, tmp: str, final: str, step: int, world: int, known: Callable[[str], str | None] = lambda p: None
    ) -> None:
        """Manifest (sizes, checksums; ``known`` gives those hashed while written), then the rename."""
        files = manifest.files_of(tmp, known)
        body = manifest.create(step, world, self.config_hash, files, replicated=self.replicated)
        atomic_write(os.path.join(tmp, MANIFEST), body)
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
        """Apply the retention policy to the committed checkpoints (see :func:`retention.retire`)."""
        return retention.retire(self.folder, self.keep_latest_k, self.uploaded, protect)
