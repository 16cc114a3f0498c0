"""Training state per rank: ViT-B/16 + AdamW on 2 ranks, DDP (replicated) against FSDP (sharded), same run.

    python bench/memory.py [--ranks 2] [--image-size 224] [--json]

Each mode starts ``--ranks`` processes (gloo on CPU), builds the model exactly as ``python -m runner
model=vitb16 parallel=ddp|fsdp`` does (runner.parallel.prepare, then AdamW over the parameters), and trains
one step (batch 2) so gradients and the optimizer's moments exist. Each rank then counts the bytes of the
training state it holds: its parameters (the local shard of a DTensor under FSDP), their gradients and the
optimizer state, by the storage each tensor owns (views and shared storages counted once). The figure is
that per-rank state under FSDP over the same under DDP; the target is <= 0.55 at 2 ranks (ideal 0.5: FSDP
also pads shards to equal sizes). DDP's gradient buckets (a second copy of the gradients, which it
all-reduces) are memory a rank holds too: printed beside, not counted in the figure. Peak RSS per rank (ru_maxrss) is
printed beside it; it includes the Python process, torch, activations and allocator slack, so it shrinks
less than the state does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ranks import on_ranks, vitb16

TARGET = 0.55


def _bytes(tensors: list[Any]) -> int:
    """Bytes of the storages behind ``tensors`` (DTensors by their local shard), each storage once."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _rank(rank: int, world: int, kind: str, image_size: int) -> dict[str, int]:
    import resource

    import torch

    model, optimizer, step, forward = vitb16(kind, image_size)
    step()
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    moments = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    buckets: list[Any] = []
    if isinstance(forward, torch.nn.parallel.DistributedDataParallel):
        buckets = [b.buffer() for b in forward.reducer._get_zeros_like_grad_buckets()]  # type: ignore[attr-defined]
    figures = {
        "params": _bytes(params),
        "grads": _bytes(grads),
        "optimizer": _bytes(moments),
        "grad_buckets": sum(b.numel() * b.element_size() for b in buckets),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    figures["state"] = figures["params"] + figures["grads"] + figures["optimizer"]
    return figures


def measure(kind: str, world: int, image_size: int) -> list[dict[str, int]]:
    return on_ranks(_rank, world, kind, image_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    modes = {kind: measure(kind, args.ranks, args.image_size) for kind in ("ddp", "fsdp")}
    ratio = max(f["state"] for f in modes["fsdp"]) / max(f["state"] for f in modes["ddp"])
    figures: dict[str, Any] = {
        "ranks": args.ranks,
        "per_rank": modes,
        "fsdp_vs_ddp_state_per_rank": round(ratio, 3),
        "fsdp_vs_ddp_peak_rss_per_rank": round(
            max(f["peak_rss"] for f in modes["fsdp"]) / max(f["peak_rss"] for f in modes["ddp"]), 3
        ),
        "target": {"fsdp_vs_ddp_state_per_rank": f"<= {TARGET}", "met": ratio <= TARGET},
    }
    if args.json:
        print(json.dumps(figures))
        return
    mb = 1e6
    print(f"ViT-B/16 + AdamW, {args.ranks} ranks, per rank (MB): params + grads + optimizer (DDP's buckets apart)")
    for kind, ranks in modes.items():
        for r, f in enumerate(ranks):
            print(
                f"  {kind} rank {r}: {f['params'] / mb:7.1f} + {f['grads'] / mb:7.1f} + {f['optimizer'] / mb:7.1f}"
                f" = {f['state'] / mb:7.1f} (buckets {f['grad_buckets'] / mb:6.1f}); peak RSS {f['peak_rss'] / mb:7.1f}"
            )
    met = "met" if ratio <= TARGET else "NOT met"
    print(f"fsdp_vs_ddp_state_per_rank = {figures['fsdp_vs_ddp_state_per_rank']}  (target <= {TARGET}: {met})")
    print(f"fsdp_vs_ddp_peak_rss_per_rank = {figures['fsdp_vs_ddp_peak_rss_per_rank']}")


if __name__ == "__main__":
    main()
