"""Rank and world size, the process group, and rank-safe collective helpers.

Rank/world come from torchrun's variables, else from SLURM (through ``submitit.JobEnvironment``), else a
single process. Backend: nccl on CUDA, gloo on CPU. Every helper is a no-op in a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"


def detect() -> DistEnv:
    """Where this process sits: torchrun's variables win, then a multi-task submitit job, else single."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            source="torchrun",
        )
    # NOTE: submitit sets SUBMITIT_FOLDER in every task it starts, on SLURM and with its local executor.
    if "SUBMITIT_FOLDER" in env:
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            return DistEnv(
                rank=job.global_rank,
                local_rank=job.local_rank,
                world_size=job.num_tasks,
                master_addr=job.hostnames[0] if "SLURM_JOB_ID" in env else "127.0.0.1",
                master_port=rendezvous_port(str(job.job_id)),
                source="slurm" if "SLURM_JOB_ID" in env else "submitit-local",
            )
    return DistEnv()


def rendezvous_port(job_id: str) -> int:
    """A port per job: from SLURM_JOB_ID (or the local job's pid), in 20000-39999.

    NOTE: SLURM_JOB_ID, not SLURM_ARRAY_JOB_ID: array members share the latter and would collide. submitit's
    ``job_id`` for an array member is ``<array>_<index>``, so the job's own id is read from the environment.
    """
    own = os.environ.get("SLURM_JOB_ID") or job_id
    digits = "".join(c for c in own if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``trainer.device``: the GPU of this rank's local rank (when CUDA is asked for or visible), else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from runner.config import ConfigError

            raise ConfigError("trainer.device: cuda requested but no CUDA device is visible; use trainer.device=cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(env: DistEnv, device: torch.device, timeout_s: float = 600.0, alone: bool = False) -> None:
    """Join the job's process group. ``alone``: a one-process job that still needs a group (FSDP at world
    size 1) gets one of its own, with an in-memory store (no port)."""
    if dist.is_initialized() or (env.world_size <= 1 and not alone):
        return
    if env.world_size <= 1:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    host = socket.gethostname()
    log.info("process group up: rank %d of %d (%s, %s) on %s", env.rank, env.world_size, backend, env.source, host)


def shutdown(together: bool = True) -> None:
    """Leave the process group; ``together`` (the normal end of a run) first waits for every rank.

    NOTE: under SLURM rank 0 hosts the rendezvous store; a rank still tearing down its group after rank 0
    has exited can block until the process-group timeout. The barrier makes every rank finish its
    collectives before any rank destroys the group. On an error path (``together=False``) the other
    ranks may never arrive, so there is no barrier.
    """
    if dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    """This process's rank on its node (0 without a process group)."""
    return detect().local_rank if dist.is_initialized() else 0


def side_group(timeout_s: float = 600.0) -> dist.ProcessGroup | None:
    """A gloo group over every rank for work on another thread (background checkpoints), so its collectives
    never interleave with the training thread's on the default group. Every rank must call this, in the same
    order. None without a process group."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def first_error(error: str | None, group: dist.ProcessGroup | None = None) -> str | None:
    """Share each rank's error (or None); every rank gets the first one, so all raise together."""
    if not dist.is_initialized():
        return error
    errors: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    for r, e in enumerate(errors):
        if e is not None:
            return f"rank {r}: {e}"
    return None


def merged(mine: dict[str, str], group: dist.ProcessGroup | None = None) -> dict[str, str]:
    """Every rank's ``mine`` merged (on every rank): e.g. the checksums each rank computed of its own files."""
    if not dist.is_initialized():
        return dict(mine)
    parts: list[dict[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return {k: v for part in parts for k, v in (part or {}).items()}


def any_true(flag: bool) -> bool:
    """True on every rank if it is true on any rank (e.g. a preemption signal seen by rank 0 only)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy), so rank 0 logs the global loss, not its shard's."""
    if not dist.is_initialized():
        return value
    t = value.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()
