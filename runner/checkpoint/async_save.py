"""Asynchronous checkpoints: copy the state to CPU buffers, return to training, write in the background.

Why a thread and not a process: the background work is DCP's file writes, fsync and checksums, which run in
C and release the GIL; a process would also need the snapshot in shared memory and a pipe for errors.
Measured on this 2-core machine (ViT-B/16 + AdamW, 1.04 GB, training a tiny ViT alongside): training
slowed x2.0-3.1 next to a thread writer and x2.5-3.4 next to a process writer, and the save itself took
as long or longer in the process. The cores are the limit, not the GIL, so the simpler thread wins.

Contract (see DESIGN.md, "Checkpoint contract"):

* the training thread only copies tensors into CPU buffers that are reused from save to save (pinned on
  CUDA), so memory does not grow per save; the write, manifest and rename happen in the worker, through
  the same :meth:`Checkpointer.save` as a synchronous save, so the files are identical and the syncer only
  ever sees committed folders (``step_<N>.tmp`` until the rename);
* at most one save is in flight; a new one waits for it (``trainer.ckpt_in_flight=wait``) or is skipped
  (``skip``);
* a failed background save is raised on the training thread by the next :meth:`check` (every step),
  :meth:`save` or :meth:`wait`; it is never dropped;
* ``save(..., block=True)`` and :meth:`wait` return only once the checkpoint is committed (final save,
  preemption).

With several ranks (DDP or FSDP) every rank snapshots its own share (a DTensor's local shard under FSDP)
and its worker writes it through a process group of its own (``Checkpointer.group``), so the save's
collectives never interleave with training's. The ranks must then take the same decisions at the same
step: whether to skip a save (``agree``) and when a failed save is raised (at the next save, wait or close,
never mid-step, since each rank's worker may finish at a different step; the save's own error sharing makes
every rank's save fail together).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy
import torch
from torch.distributed.tensor import DTensor

from runner.checkpoint.errors import CheckpointError, one_line

log = logging.getLogger(__name__)

IN_FLIGHT = ("wait", "skip")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class Frozen:
    """A snapshot that :meth:`Checkpointer.save` accepts in place of a live ``TrainState``."""

    step: int
    tensors: dict[str, Any]
    meta: dict[str, Any]

    def tensors_and_meta(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.tensors, self.meta


class SnapshotRaceError(RuntimeError):
    """A tensor changed while it was being copied: the loop skipped :meth:`AsyncSaver.fence`."""


class Snapshot:
    """CPU copies of a nested ``{section: {key: tensor}}`` payload, in buffers kept between saves.

    A buffer is reallocated only when a tensor's shape or dtype changes (e.g. optimizer state appearing
    after the first step), so steady-state saves allocate nothing.

    Deferred copies (CPU training): tensors that only the optimizer step changes (parameters, optimizer
    state) may be copied by the worker instead of the training thread, while the next forward/backward
    runs; the loop calls :meth:`fence` before the next optimizer step. Everything else (e.g. BatchNorm
    running stats, which a forward pass updates) is copied at once. Each deferred tensor's version
    counter is checked after its copy, so a loop that forgets the fence gets a failed save, not a torn
    checkpoint.
    """

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self.buffers: dict[str, torch.Tensor] = {}
        #: Set once the copies are complete (matters on CUDA, where they are asynchronous).
        self._copied: torch.cuda.Event | None = None
        self._deferred: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []
        self._landed = threading.Event()
        self._landed.set()

    def copy(self, payload: dict[str, Any], defer: Callable[[torch.Tensor], bool] | None = None) -> dict[str, Any]:
        """Buffers holding ``payload``; those for which ``defer(tensor)`` is true are filled by :meth:`finish`."""
        self._deferred = []
        out: dict[str, Any] = {}
        for section, tensors in payload.items():
            out[section] = {}
            for key, live in tensors.items():
                t = _local(live.detach())
                buf = self._buffer(f"{section}.{key}", t)
                if defer is not None and t.device.type == "cpu" and defer(t):
                    self._deferred.append((f"{section}.{key}", buf, t, t._version))
                else:
                    _copy(buf, t)
                out[section][key] = _like(live, buf)
        if self._deferred:
            self._landed.clear()
        if self.pin and torch.cuda.is_available():
            # NOTE: the copies are queued on the current stream, before the next optimizer step on the
            # same stream, so the step cannot overwrite a tensor before it is copied. The worker waits on
            # this event, never the training thread.
            self._copied = torch.cuda.Event()
            self._copied.record()
        return out

    def finish(self) -> None:
        """In the worker: make the deferred copies, then wait for device copies to land."""
        try:
            for key, buf, src, version in self._deferred:
                _copy(buf, src)
                if src._version != version:
                    raise SnapshotRaceError(
                        f"{key} changed while an async checkpoint was copying it; the training loop must call "
                        "Checkpointer.fence() before the optimizer step (or use trainer.async_ckpt=false)"
                    )
        finally:
            self._deferred = []
            self._landed.set()
        if self._copied is not None:
            self._copied.synchronize()

    def fence(self) -> None:
        """Block until the deferred copies are done (the tensors may change after this returns)."""
        self._landed.wait()

    def abandon(self) -> None:
        """Forget deferred copies that no worker will make."""
        self._deferred = []
        self._landed.set()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def _buffer(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = self.pin and t.device.type == "cuda"
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self.buffers[key] = buf
        return buf


def _like(live: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``buf`` in the form DCP must see: a DTensor of the same mesh, placements and global shape as ``live``
    (no communication: the layout is given), or the plain buffer."""
    if not isinstance(live, DTensor):
        return buf
    return DTensor.from_local(
        buf, live.device_mesh, live.placements, run_check=False, shape=live.shape, stride=live.stride()
    )


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; large CPU tensors as one single-threaded memcpy that releases the GIL.

    NOTE: torch's copy would start an OpenMP team in whichever thread calls it: on 2 busy cores a
    2-thread copy of 1 GB measured 0.4-1.9 s (the team waits for the slower core) against 0.1-0.2 s for
    one thread, and from the worker thread it would add a second team next to the training thread's.
    """
    if src.device.type == "cpu" and src.dim() > 0 and src.is_contiguous() and src.nbytes >= 1 << 20:
        numpy.copyto(dst.view(-1).view(torch.uint8).numpy(), src.view(-1).view(torch.uint8).numpy())
    else:
        dst.copy_(src, non_blocking=dst.is_pinned())


def optimizer_owned(state: Any) -> Callable[[torch.Tensor], bool]:
    """Predicate: is this tensor changed only by the optimizer step (a parameter or optimizer state)?"""
    storages = {_local(p).untyped_storage().data_ptr() for p in state.model.parameters()}
    for per_param in state.optimizer.state.values():
        storages.update(
            _local(v).untyped_storage().data_ptr() for v in per_param.values() if isinstance(v, torch.Tensor)
        )
    return lambda t: t.untyped_storage().data_ptr() in storages


class AsyncSaver:
    """Snapshot on the caller's thread; ``write`` (``Checkpointer.write``: DCP, manifest, rename) on a worker.

    ``folder_of(step)`` names the folder a step commits to, returned by a non-blocking :meth:`save`.
    """

    def __init__(
        self,
        write: Callable[[Frozen], str],
        folder_of: Callable[[int], str],
        in_flight: str = "wait",
        pin: bool = False,
        defer_copy: bool = False,
        agree: Callable[[str | None], str | None] | None = None,
    ) -> None:
        if in_flight not in IN_FLIGHT:
            raise ValueError(f"trainer.ckpt_in_flight={in_flight!r}: choose one of {', '.join(IN_FLIGHT)}")
        self._write_fn = write
        self._folder_of = folder_of
        self.in_flight = in_flight
        self.snapshot = Snapshot(pin=pin)
        #: Leave copies of parameters and optimizer state to the worker (the caller must :meth:`fence`).
        self.defer_copy = defer_copy
        #: With several ranks: ``agree(error or None)`` gives every rank the first rank's error (a collective,
        #: ``distributed.first_error``), so all ranks skip the same saves and fail the same snapshots; a
        #: failed write then surfaces only at save/wait/close (see the module docstring).
        self.agree = agree
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._pending: Future[str] | None = None
        self._pending_step = -1
        self._lock = threading.Lock()
        #: Seconds the training thread spent in the last ``save`` (copy + any wait for the previous one).
        self.last_stall_s = 0.0
        #: Seconds the training thread waited in the last :meth:`fence`.
        self.last_fence_s = 0.0
        self.skipped = 0

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def save(self, state: Any, block: bool = False) -> str:
        """Snapshot ``state`` and start writing it; with ``block`` return only once it is committed.

        Returns the folder the checkpoint will have once committed, or "" if skipped because a save was
        still in flight (``trainer.ckpt_in_flight=skip``).
        """
        started = time.perf_counter()
        skip = self.in_flight == "skip" and not block and self._agreed(self.busy)
        if skip:
            self.skipped += 1
            log.warning(
                "step %d: checkpoint skipped, the one for step %d is still being written "
                "(trainer.ckpt_in_flight=skip; use wait to never skip)",
                state.step,
                self._pending_step,
            )
            self.last_stall_s = time.perf_counter() - started
            return ""
        self.wait()  # at most one in flight; also raises a failure of the previous one
        frozen = self._freeze(state)
        with self._lock:
            try:
                self._pending = self._pool.submit(self._write, frozen)
            except BaseException:
                self.snapshot.abandon()  # NOTE: else the next fence() would wait forever
                raise
            self._pending_step = frozen.step
        self.last_stall_s = time.perf_counter() - started
        if block:
            return self.wait() or ""
        return self._folder_of(frozen.step)

    def _freeze(self, state: Any) -> Frozen:
        """The snapshot; with several ranks, a failure on any rank raises on every rank (no worker is left
        waiting for a peer that never starts its write)."""
        error: Exception | None = None
        try:
            tensors, meta = state.tensors_and_meta()
            defer = optimizer_owned(state) if self.defer_copy and hasattr(state, "optimizer") else None
            frozen = Frozen(state.step, self.snapshot.copy(tensors, defer), meta)
        except Exception as e:
            if self.agree is None:
                raise
            error = e
        if self.agree is not None:
            reason = self.agree(one_line(error) if error is not None else None)
            if reason is not None:
                self.snapshot.abandon()
                raise CheckpointError(f"saving checkpoint at step {state.step} failed: {reason}") from error
        return frozen

    def _agreed(self, busy: bool) -> bool:
        """Busy here, or (with several ranks) on any rank."""
        return self.agree("busy" if busy else None) is not None if self.agree is not None else busy

    def _write(self, frozen: Frozen) -> str:
        self.snapshot.finish()
        return self._write_fn(frozen)

    def fence(self) -> None:
        """Call before the optimizer step: returns once the worker has copied what the step will change."""
        started = time.perf_counter()
        self.snapshot.fence()
        self.last_fence_s = time.perf_counter() - started

    def check(self) -> None:
        """Raise here (the training thread) if the background save has failed; cheap when it has not.

        With several ranks this waits for the next save, wait or close: a rank raising here alone, a step
        before or after the others, would leave them in a training collective it never joins."""
        pending = self._pending
        if self.agree is None and pending is not None and pending.done():
            self.wait()

    def wait(self) -> str | None:
        """Block until the save in flight (if any) is committed; re-raise its failure. Returns its folder."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending.result()

    def close(self) -> None:
        """Wait for the last save and stop the worker. Raises the last save's failure, if any."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
