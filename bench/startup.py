"""Start-up: ``python -m runner --cfg job`` and time to the first training step, against ``import torch``.

    python bench/startup.py [--rounds 5] [--json]

Each is a fresh process, timed wall-clock from launch (rounds alternate the three):

- ``python -c "import torch"``: the floor any PyTorch program pays;
- ``python -m runner --cfg job``: compose and print the config (target: within 1.5x of ``import torch``,
  so heavy modules such as torch must stay out of that path);
- ``python -m runner`` (default tiny ViT) to the end of its first training step: launch until the
  ``time`` of the step-1 record in metrics.jsonl (``trainer.log_every=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def timed(cmd: list[str], cwd: str) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=cwd, env=_env())
    return time.perf_counter() - started


def first_step(workdir: str) -> float:
    run_dir = os.path.join(workdir, f"run-{time.monotonic_ns()}")
    cmd = [sys.executable, "-m", "runner", "trainer.max_steps=2", "trainer.log_every=1", "trainer.threads=1"]
    cmd += ["trainer.eval_batches=1", "trainer.resume=none", f"hydra.run.dir={run_dir}"]
    launched = time.time()
    subprocess.run(cmd, check=True, capture_output=True, cwd=workdir, env=_env())
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    step1 = next(r for r in records if r.get("split") == "train" and r["step"] == 1)
    return float(step1["time"]) - launched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"import_torch_s": [], "cfg_job_s": [], "first_step_s": []}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as workdir:
        timed([sys.executable, "-c", "import torch"], workdir)  # warm the file cache once, untimed
        for r in range(args.rounds):
            jobs = ["import_torch_s", "cfg_job_s", "first_step_s"]
            for job in jobs[r % 3 :] + jobs[: r % 3]:
                if job == "import_torch_s":
                    samples[job].append(timed([sys.executable, "-c", "import torch"], workdir))
                elif job == "cfg_job_s":
                    samples[job].append(timed([sys.executable, "-m", "runner", "--cfg", "job"], workdir))
                else:
                    samples[job].append(first_step(workdir))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}

    def ratio(key: str) -> float:
        return statistics.median(a / b for a, b in zip(samples[key], samples["import_torch_s"], strict=True))

    figures: dict[str, Any] = {
        "rounds": args.rounds,
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "cfg_job_vs_import_torch": round(ratio("cfg_job_s"), 3),
        "first_step_vs_import_torch": round(ratio("first_step_s"), 3),
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
    figures["target"] = {
        "cfg_job_vs_import_torch": f"<= {TARGET}",
        "met": figures["cfg_job_vs_import_torch"] <= TARGET,
    }
    if args.json:
        print(json.dumps(figures))
        return
    s = figures["seconds"]
    print(f"start-up, fresh processes, median of {args.rounds} rounds\n")
    print(f"| {'command':<52} | {'seconds':>7} | {'vs import torch':>15} |")
    print(f"|{'-' * 54}|{'-' * 9}|{'-' * 17}|")
    rows = [
        ('python -c "import torch"', s["import_torch_s"], 1.0),
        ("python -m runner --cfg job", s["cfg_job_s"], figures["cfg_job_vs_import_torch"]),
    ]
    for name, sec, vs in rows:
        print(f"| {name:<52} | {sec:>7.2f} | {vs:>15.2f} |")
    label = "python -m runner: launch to end of first step"
    print(f"| {label:<52} | {s['first_step_s']:>7.2f} | {figures['first_step_vs_import_torch']:>15.2f} |")
    met = "met" if figures["target"]["met"] else "NOT met"
    print(f"\ncfg_job_vs_import_torch = {figures['cfg_job_vs_import_torch']} (target <= {TARGET}: {met})")


if __name__ == "__main__":
    main()
