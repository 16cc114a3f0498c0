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


def vitb16(kind: str, image_size: int) -> tuple[Any, Any, Callable[..., None], Any]:
    """ViT-B/16 + AdamW built as ``python -m runner model=vitb16 parallel=<kind>`` builds it, on this rank:
    (model, optimizer, step, forward) where ``step(fence)`` trains one step on a batch of 2 (``fence`` runs between
    backward and the optimizer step, where the training loop fences an async checkpoint)."""
    import torch
    import torch.nn.functional as F

    from runner import parallel
    from runner.config import ParallelConfig, ParallelKind
    from runner.models.vit import VisionTransformer
    from runner.train.optim import param_groups

    torch.manual_seed(0)
    model = VisionTransformer(image_size=image_size, patch_size=16, num_classes=1000, width=768, depth=12, heads=12)
    cfg = ParallelConfig(kind=ParallelKind(kind))
    model = parallel.prepare(model, cfg, activation_checkpointing=False, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    forward = parallel.wrap(model, cfg, torch.device("cpu"), compile_model=False)
    images, labels = torch.randn(2, 3, image_size, image_size), torch.randint(1000, (2,))

    def step(fence: Callable[[], None] = lambda: None) -> None:
        optimizer.zero_grad(set_to_none=True)  # first, so the gradients stay for whoever measures them
        F.cross_entropy(forward(images), labels).backward()
        fence()
        optimizer.step()

    return model, optimizer, step, forward
