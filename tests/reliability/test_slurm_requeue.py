"""A job requeued twice in a row on the real SLURM cluster (tests/slurm/cluster.sh) resumes correctly.

The same array member (2 ranks, gloo) gets the requeue signal (``scancel --signal=USR2``) once, and again
after it came back and trained on; each time it must save on the signal, requeue, resume from exactly that
checkpoint, and the end must be bitwise identical to an uninterrupted run with the same world size.

Only in the full suite (``nox -s reliability``): it takes minutes on 2 cores. conftest.py deselects it in
the default session (a deselect, not a skip: the full suite must run it, under CI too).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from runner.checkpoint.load import read_tensors
from tests.conftest import TINY
from tests.helpers.dist import start, stop
from tests.reliability import summary
from tests.slurm.conftest import ON_CLUSTER, Sweep, slurm_cluster, wait_for

pytestmark = [*ON_CLUSTER, pytest.mark.dist, pytest.mark.slow, pytest.mark.full_suite]
__all__ = ["slurm_cluster"]  # the session fixture, imported so this folder can use it

ROW_DIST = summary.ROWS[12]
STEPS = 600
DRILL = [
    *TINY,
    f"trainer.max_steps={STEPS}",
    f"trainer.eval_every={STEPS}",
    f"trainer.ckpt_every={STEPS}",  # so the only checkpoints before the end are the ones saved on a signal
    "trainer.log_every=10",
    "hydra.launcher.max_num_timeout=3",  # >= 2 requeues on the signal
]


def _last_step(metrics: list[Path]) -> int:
    if not metrics or not metrics[0].exists():
        return 0
    records = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()]
    return max((int(r["step"]) for r in records if r.get("split") == "train"), default=0)


def _rank0_log(slurm_dir: Path) -> str:
    logs = list(slurm_dir.glob("multirun/*/*/logs/rank0.log"))
    return logs[0].read_text(errors="replace") if logs else ""


def test_requeued_twice_in_a_row_resumes_and_matches_uninterrupted(tmp_path: Path) -> None:
    slurm_dir, ref_dir = tmp_path / "slurm", tmp_path / "reference"
    slurm_dir.mkdir()
    ref_dir.mkdir()
    sweep = Sweep(["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", *DRILL], slurm_dir)
    reference = None
    metrics = lambda: list(slurm_dir.glob("multirun/*/*/metrics.jsonl"))  # noqa: E731
    signalled: list[int] = []
    try:
        for n in (1, 2):
            # Train on past the last resume point before signalling again: a requeue "in a row", not a race.
            floor = (signalled[-1] if signalled else 0) + 30
            wait_for(f"training to pass step {floor}", lambda f=floor: _last_step(metrics()) >= f, 300, sweep)
            if n == 2:
                assert len(re.findall(r"resuming from step", _rank0_log(slurm_dir))) == 1
            signalled.append(_last_step(metrics()))
            (job,) = sweep.job_ids()
            subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
            wait_for(
                f"requeue {n} to resume",
                lambda k=n: len(re.findall(r"resuming from step", _rank0_log(slurm_dir))) >= k,
                300,
                sweep,
            )
        # The uninterrupted run with the same config (same world size, gloo) while the job finishes.
        reference = start(["runner", *DRILL[:-1]], ref_dir, log=ref_dir / "reference.log")
        assert sweep.wait(timeout=600) == 0, sweep.output()
        assert reference.wait(timeout=300) == 0, (ref_dir / "reference.log").read_text()[-3000:]
    finally:
        sweep.close()
        if reference is not None:
            stop(reference)

    (member,) = [p.parent for p in metrics()]
    log0 = (member / "logs" / "rank0.log").read_text()
    saved = [int(s) for s in re.findall(r"checkpoint saved at step (\d+) on the requeue signal", log0)]
    resumed = [int(s) for s in re.findall(r"resuming from step (\d+)", log0)]
    assert len(saved) == 2 and saved == resumed, (saved, resumed, log0[-3000:])
    assert signalled[0] <= saved[0] < signalled[1] <= saved[1] < STEPS, (signalled, saved)
    # keep_latest_k=2: the first signal checkpoint has been retired by now; the second one is still there.
    files = json.loads((member / "checkpoints" / f"step_{saved[1]}" / "manifest.json").read_text())["files"]
    assert {"rank_0.json", "rank_1.json"} <= set(files)  # both ranks took part
    final = read_tensors(str(member / "checkpoints" / f"step_{STEPS}"))
    expected = read_tensors(str(ref_dir / "outputs" / member.name / "checkpoints" / f"step_{STEPS}"))
    assert final.keys() == expected.keys()
    different = [k for k in final if not torch.equal(final[k], expected[k])]
    assert not different, f"tensors differ from the uninterrupted run: {different[:5]}"
    summary.case(ROW_DIST)
