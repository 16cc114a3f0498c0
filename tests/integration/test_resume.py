"""Kill a run after a checkpoint, run the same command again: it resumes and ends bitwise identical.

The kill needs a process of its own; the runs of the other tests go through the entry in this process
(tests/helpers/inproc.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from runner.train.metrics import read_metrics
from tests.conftest import cli_env, run_cli
from tests.helpers.inproc import run_cli_here
from tests.helpers.runs import final_tensors

ARGS = [
    "+debug=tiny",
    "trainer.max_steps=40",
    "trainer.ckpt_every=5",
    "trainer.keep_latest_k=3",
    "trainer.log_every=3",  # deliberately not a divisor of ckpt_every: windows span the resume
    "trainer.eval_every=10",
]


def losses(run_dir: Path) -> dict[tuple[str, int], float]:
    return {(r["split"], r["step"]): r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl"))}


def test_sigkill_then_rerun_resumes_bitwise_identically(tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_cli([*ARGS, f"hydra.run.dir={straight}"], cwd=tmp_path)

    cmd = [sys.executable, "-m", "runner", *ARGS, f"hydra.run.dir={interrupted}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (interrupted / "checkpoints" / "step_10").exists():
            assert proc.poll() is None, "run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = max(int(p.name.split("_")[1]) for p in (interrupted / "checkpoints").glob("step_*[0-9]"))
    assert killed_at < 40, "the run finished before the kill"

    again = run_cli([*ARGS, f"hydra.run.dir={interrupted}"], cwd=tmp_path)
    first_line = again.stdout.splitlines()[0]
    assert f"resuming from step {killed_at}" in first_line, again.stdout[:2000]
    assert "trainer.resume=none" in first_line

    a, b = final_tensors(straight, 40), final_tensors(interrupted, 40)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(straight) == losses(interrupted)
    # Every record once: those the killed process wrote past its last checkpoint were dropped at the resume.
    raw = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["step"]) for r in raw if "step" in r]
    assert len(keys) == len(set(keys)), sorted(keys)
    assert keys == [
        (r["split"], r["step"])
        for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
        if "step" in r
    ]
    rank0 = json.loads((interrupted / "checkpoints" / "step_40" / "rank_0.json").read_text())
    assert rank0["step"] == 40


def test_completed_run_says_so_and_does_nothing(tmp_path: Path) -> None:
    args = ["+debug=tiny", f"hydra.run.dir={tmp_path / 'run'}"]
    run_cli_here(args, cwd=tmp_path)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    again = run_cli_here(args, cwd=tmp_path)
    assert "already complete at step 6" in again.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_resume_none_starts_fresh_and_keeps_the_old_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli_here(["+debug=tiny", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    fresh = run_cli_here(["+debug=tiny", f"hydra.run.dir={run_dir}", "trainer.resume=none"], cwd=tmp_path)
    assert "starting fresh" in fresh.stdout
    for old in ("checkpoints", "metrics.jsonl", "tb"):  # set aside, not drawn on top of the new run's curves
        assert any(p.name.startswith(f"{old}.replaced-") for p in run_dir.iterdir()), old
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "checkpoints" / "step_6" / "manifest.json").exists()


def test_default_name_comes_from_overrides_not_the_clock(tmp_path: Path) -> None:
    run_cli_here(["+debug=tiny", "trainer.max_steps=2"], cwd=tmp_path)
    run_cli_here(["+debug=tiny", "trainer.max_steps=4"], cwd=tmp_path)
    runs = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert runs == ["debug=tiny"]
    assert (tmp_path / "outputs" / "debug=tiny" / "checkpoints" / "step_4").exists()
