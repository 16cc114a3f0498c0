"""Crash consistency: SIGKILL a run at seeded random instants, resume it, compare with an uninterrupted run.

Per trial: start ``python -m runner +debug=tiny ...`` with a checkpoint every step (so a good share of the
run is spent inside saves), kill it, and then, with the process gone and the disk frozen:
(a) every committed ``step_<N>`` folder verifies (sizes and checksums against its manifest), and the rerun
    resumes from the newest of them, so a torn or partial checkpoint is never what gets loaded;
(b) the rerun of the same command finishes;
(c) its final weights and optimizer state equal the uninterrupted reference run's, bit for bit.

Half of the trials kill at a uniformly drawn instant of the training window; the other half wait a random
time and then kill as soon as a ``step_*.tmp`` folder is seen, to make kills inside a save frequent. What
counts as "during a save" is what was on disk after the kill, not what was aimed at.

NOTE: a SIGKILL'd process is the crash model here; power loss (unsynced page cache) is not simulated.
Extension point: ``Trial.sync_active`` stays False until the storage branch adds a remote and a way to see
an upload in flight; its kills-during-sync row is listed as pending in the summary.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from runner.checkpoint.manifest import verify
from runner.storage import LocalStorage
from tests.conftest import cli_env, run_cli
from tests.helpers.runs import committed_steps, final_tensors
from tests.reliability import summary
from tests.reliability.conftest import trials

MAX_STEPS = 12
ARGS = [
    "+debug=tiny",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.ckpt_every=2",
    "trainer.keep_latest_k=2",
    "trainer.log_every=3",
    "trainer.eval_every=4",
]
SEED = 20261123
ROW_TRIALS, ROW_SAVE, ROW_STEP, ROW_VERIFIED, ROW_IDENTICAL = summary.ROWS[:5]


@dataclass
class Trial:
    index: int
    mode: str  # "instant" or "save"
    delay_s: float
    killed: bool = False
    during_save: bool = False
    sync_active: bool = False  # extension point for the storage branch
    resumed_from: int | None = None


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], float]:
    """One uninterrupted run: its final tensors, and how long its training loop took."""
    root = tmp_path_factory.mktemp("reference")
    proc = run_cli([*ARGS, f"hydra.run.dir={root / 'run'}"], cwd=root)
    took = re.search(r"finished at step \d+ in ([\d.]+)s", proc.stdout + proc.stderr)
    assert took is not None, proc.stdout[-2000:]
    return final_tensors(root / "run", MAX_STEPS), float(took.group(1))


def _kill_one(trial: Trial, run_dir: Path, cwd: Path, train_s: float) -> None:
    cmd = [sys.executable, "-m", "runner", *ARGS, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = run_dir / "logs" / "rank0.log"  # written just before the model is built
        deadline = time.monotonic() + 300
        while not ready.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.005)
        time.sleep(trial.delay_s)
        if trial.mode == "save":
            ckpts = run_dir / "checkpoints"
            while proc.poll() is None and not (ckpts.is_dir() and any(ckpts.glob("step_*.tmp"))):
                time.sleep(0.001)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            trial.killed = True
    finally:
        proc.kill()  # no-op if already dead; never leaves a process behind
        proc.wait()
    if trial.killed:
        assert proc.returncode == -signal.SIGKILL
        ckpts = run_dir / "checkpoints"
        trial.during_save = ckpts.is_dir() and any(ckpts.glob("step_*.tmp"))


def test_sigkill_at_random_instants_resumes_bitwise_identically(
    tmp_path: Path, reference: tuple[dict[str, torch.Tensor], float]
) -> None:
    expected, train_s = reference
    rng = random.Random(SEED)
    wanted = trials()
    done: list[Trial] = []
    for index in range(wanted * 2):  # a run that finishes before its kill is not a trial; draw again
        if len(done) == wanted:
            break
        mode = "instant" if index % 2 == 0 else "save"
        window = train_s * (1.0 if mode == "instant" else 0.7)
        trial = Trial(index, mode, delay_s=rng.uniform(0.0, window))
        run_dir = tmp_path / f"trial{index}"
        _kill_one(trial, run_dir, tmp_path, train_s)
        if not trial.killed:
            continue

        # (a) nothing committed is torn: every step_<N> verifies against its manifest.
        steps = sorted(committed_steps(run_dir))
        for step in steps:
            manifest, reason = verify(LocalStorage(str(run_dir)), f"checkpoints/step_{step}")
            assert manifest is not None, f"trial {index}: committed step_{step} is torn: {reason}"
        # (b) the same command again finishes, resuming from the newest committed checkpoint.
        again = run_cli([*ARGS, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        head = "\n".join(again.stdout.splitlines()[:3])
        if steps:
            trial.resumed_from = steps[-1]
            assert f"resuming from step {steps[-1]} " in head, f"trial {index}: {head}"
        else:
            assert "starting fresh" in head, f"trial {index}: {head}"
        assert "skipping checkpoint" not in again.stdout + again.stderr
        # (c) bitwise identical to the uninterrupted run.
        got = final_tensors(run_dir, MAX_STEPS)
        assert got.keys() == expected.keys() and len(got) > 0
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"trial {index}: {key} differs"

        done.append(trial)
        summary.case(ROW_TRIALS)
        summary.case(ROW_SAVE if trial.during_save else ROW_STEP)
        summary.case(ROW_VERIFIED)
        summary.case(ROW_IDENTICAL)
        shutil_rmtree(run_dir)

    during_save = sum(t.during_save for t in done)
    print(
        f"\nkill trials: {len(done)}, during a save: {during_save}, during a step: {len(done) - during_save}, "
        f"identical: {len(done)}, resumed from: {[t.resumed_from for t in done]}"
    )
    assert len(done) == wanted, f"only {len(done)} of {wanted} runs could be killed before they finished"
    if wanted >= 4:
        assert during_save >= 1, "no kill landed inside a save: the harness is not exercising what it claims"


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
