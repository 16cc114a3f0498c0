"""Run one function on N local ranks (spawned processes, gloo on CPU) and collect what each returns."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...], out: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out.put((rank, fn(rank, world, *args)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 1800) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes inside one process group; their results by rank.

    ``fn`` must be importable (a module-level function): the processes are spawned, not forked.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}: rank processes exited with {failed}")
    return [results[r] for r in range(world)]
