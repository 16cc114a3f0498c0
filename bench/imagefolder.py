"""Image-folder accuracy: held-out top-1 of ``python -m runner data=imagefolder`` (its default data settings)
against a bare hand-written PyTorch loop, on real images.

    python bench/imagefolder.py [--rounds 1] [--steps 300] [--threads 1] [--json] [runner overrides ...]

The data are scikit-learn's digits (1,797 real 8x8 scans, 10 classes), written as a train/val PNG tree
(80/20, a fixed permutation) at 32x32 (tests/helpers/digits.py, shared with the test). Both train the
default ``vit_tiny`` (same class and shape), AdamW (lr 1e-3, weight decay 0.05 on weights), the cosine
schedule with 20 warmup steps, gradient clipping at 1.0, batch 64, 300 steps, the same thread count. The
bare loop uses the images as they are (no augmentation); runner uses its defaults for everything but the
root, class count, image size and loader workers (0: the data are the same whatever the count). Both run
in this process, one after the other. The figure is ``imagefolder_vs_bare``, runner's top-1 over the bare
loop's (median over rounds, round r training both with seed r; target >= 0.95). Extra arguments are
runner overrides (e.g. ``data.transform=rrc``) to measure another recipe the same way.

tests/integration/test_imagefolder.py runs the same comparison at a quarter of the compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="round r trains both with seed r (init, order)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", help="runner overrides applied to runner's side only")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.helpers.digits import Recipe, bare_top1, runner_top1, write_digits

    base = Recipe(steps=args.steps, threads=args.threads)
    bare: list[float] = []
    ours: list[float] = []
    seconds: dict[str, float] = {"bare": 0.0, "runner": 0.0}
    with tempfile.TemporaryDirectory(prefix="bench-imagefolder-") as workdir:
        root = Path(workdir, "digits")
        n_train, n_val = write_digits(root, base.image_size)
        for seed in range(args.rounds):
            recipe = replace(base, seed=seed)
            started = time.perf_counter()
            bare.append(bare_top1(root, recipe))
            seconds["bare"] += time.perf_counter() - started
            started = time.perf_counter()
            run_dir = Path(workdir, f"seed{seed}")
            run_dir.mkdir()
            ours.append(runner_top1(root, recipe, run_dir, *args.overrides))
            seconds["runner"] += time.perf_counter() - started
            print(f"seed {seed}: bare {bare[-1]:.4f}, runner {ours[-1]:.4f}", file=sys.stderr, flush=True)
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    figures: dict[str, Any] = {
        "dataset": f"sklearn digits at {base.image_size}x{base.image_size}, {n_train} train / {n_val} val",
        "steps": args.steps,
        "batch": base.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "runner_overrides": args.overrides,
        "bare_top1": round(statistics.median(bare), 4),
        "runner_top1": round(statistics.median(ours), 4),
        "imagefolder_vs_bare": round(statistics.median(ratios), 3),
        "imagefolder_vs_bare_per_seed": [round(x, 3) for x in ratios],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    figures["target"] = {"imagefolder_vs_bare": f">= {TARGET}", "met": figures["imagefolder_vs_bare"] >= TARGET}
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{figures['dataset']}; vit_tiny, AdamW, cosine, batch {base.batch_size}, {args.steps} steps")
    print(f"rounds {args.rounds}, medians of held-out top-1\n")
    print(f"| {'trainer':<58} | {'top-1':>7} |")
    print(f"|{'-' * 60}|{'-' * 9}|")
    print(f"| {'bare PyTorch loop (images as they are)':<58} | {figures['bare_top1']:>7.4f} |")
    label = "python -m runner data=imagefolder " + " ".join(args.overrides or ["(defaults)"])
    print(f"| {label[:58]:<58} | {figures['runner_top1']:>7.4f} |")
    met = "met" if figures["target"]["met"] else "NOT met"
    per_seed = figures["imagefolder_vs_bare_per_seed"]
    print(f"\nimagefolder_vs_bare = {figures['imagefolder_vs_bare']} (per seed {per_seed}; target >= {TARGET}: {met})")


if __name__ == "__main__":
    main()
