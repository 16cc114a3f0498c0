"""Async checkpoints with several ranks: the training-thread stall against a synchronous save, DDP and FSDP.

    python bench/checkpoint_ranks.py [--ranks 2] [--rounds 3] [--image-size 224] [--json]

Each mode starts ``--ranks`` processes (gloo on CPU) and builds ViT-B/16 + AdamW as ``python -m runner
model=vitb16 parallel=ddp|fsdp`` does (runner.parallel.prepare), trains one step so the optimizer state
exists, then alternates, ``--rounds`` times: a synchronous save (``Checkpointer.save``: every rank writes its
share through DCP, the manifest, the rename), and an async save followed by the next training step. The
async stall is what the training thread loses to it: the ``save`` call (snapshot into reused CPU buffers)
plus the fence before the next optimizer step (waiting for deferred copies). The background write runs on a
gloo process group of its own while the training step runs its own collectives on the default group.

Figures: ``async_stall_vs_sync_ddp2`` and ``async_stall_vs_sync_fsdp2`` (median stall / median sync save,
the slowest rank of each round); target <= 0.05.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ranks import on_ranks, vitb16

TARGET = 0.05


class _NoData:
    """The data position a checkpoint records; the benchmark has none."""

    def state_dict(self) -> dict[str, Any]:
        return {}


def _rank(rank: int, world: int, kind: str, image_size: int, rounds: int, root: str) -> dict[str, list[float]]:
    from runner import distributed
    from runner.checkpoint.save import Checkpointer
    from runner.checkpoint.state import TrainState

    model, optimizer, train_step, _ = vitb16(kind, image_size)
    state = TrainState(model=model, optimizer=optimizer, data=_NoData())
    train_step()
    replicated = kind == "ddp"
    sync = Checkpointer(os.path.join(root, kind, "sync"), keep_latest_k=1, config_hash="bench", replicated=replicated)
    background = Checkpointer(
        os.path.join(root, kind, "async"),
        keep_latest_k=1,
        config_hash="bench",
        replicated=replicated,
        group=distributed.side_group(),
    )
    background.enable_async(defer_copy=True)
    out: dict[str, list[float]] = {"sync_s": [], "stall_s": [], "commit_s": []}
    for _ in range(rounds):
        state.step += 1
        distributed.barrier()
        started = time.perf_counter()
        sync.save(state)
        out["sync_s"].append(time.perf_counter() - started)
        state.step += 1
        distributed.barrier()
        started = time.perf_counter()
        background.save(state)
        train_step(background.fence)
        out["stall_s"].append(background.last_stall_s)  # the save call and the fence
        background.wait()
        out["commit_s"].append(time.perf_counter() - started)
    background.close()
    return out


def measure(kind: str, world: int, image_size: int, rounds: int, root: str) -> dict[str, float]:
    per_rank = on_ranks(_rank, world, kind, image_size, rounds, root)
    slowest = {key: [max(r[key][i] for r in per_rank) for i in range(rounds)] for key in per_rank[0]}
    return {key: round(statistics.median(values), 4) for key, values in slowest.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-ckpt-ranks-", dir=args.dir)
    try:
        modes = {kind: measure(kind, args.ranks, args.image_size, args.rounds, root) for kind in ("ddp", "fsdp")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures: dict[str, Any] = {"ranks": args.ranks, "rounds": args.rounds, "medians": modes}
    for kind, m in modes.items():
        figures[f"async_stall_vs_sync_{kind}{args.ranks}"] = round(m["stall_s"] / m["sync_s"], 4)
    figures["target"] = {k: f"<= {TARGET}" for k in figures if k.startswith("async_stall_vs_sync")}
    if args.json:
        print(json.dumps(figures))
        return
    print(f"ViT-B/16 + AdamW, {args.ranks} ranks, medians of {args.rounds} rounds (slowest rank), seconds")
    for kind, m in modes.items():
        print(f"  {kind}: sync save {m['sync_s']:.3f}; async: stall {m['stall_s']:.4f}, committed {m['commit_s']:.3f}")
    for key in figures["target"]:
        met = "met" if figures[key] <= TARGET else "NOT met"
        print(f"{key} = {figures[key]}  (target <= {TARGET}: {met})")


if __name__ == "__main__":
    main()
