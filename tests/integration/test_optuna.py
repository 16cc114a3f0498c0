"""Acceptance 6 of issue 4: sweep members return their objective; Optuna maximises it end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, run_cli
from tests.helpers.inproc import run_cli_here

pytestmark = pytest.mark.slow


def _final_top1(member: Path) -> float:
    records = [json.loads(line) for line in (member / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("split") == "eval"]
    return float(max(evals, key=lambda r: r["step"])["top1"])


def _check_best(tmp_path: Path, proc_output: str, trials: int) -> None:
    (results,) = tmp_path.glob("multirun/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    members = [p.parent for p in results.parent.glob("*/metrics.jsonl")]
    assert len(members) == trials
    objectives = [_final_top1(m) for m in members]
    # The sweeper saw each member's return value: its best is the best final eval top-1 of the members.
    assert best["best_value"] == pytest.approx(max(objectives))
    assert f"Best value: {best['best_value']}" in proc_output


def test_optuna_preset_on_the_basic_launcher(tmp_path: Path) -> None:
    proc = run_cli_here(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *TINY], tmp_path)
    _check_best(tmp_path, proc.stdout + proc.stderr, trials=3)
    assert "setup plugin" not in proc.stdout + proc.stderr  # alembic's chatter (Optuna imports it)


def test_optuna_sweeper_on_the_submitit_local_launcher(tmp_path: Path) -> None:
    args = [
        "-m",
        "hydra/sweeper=optuna",
        "hydra/launcher=local",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "opt.lr=tag(log,interval(1e-4,1e-2))",
        *TINY,
    ]
    proc = run_cli(args, tmp_path, timeout=240)
    _check_best(tmp_path, proc.stdout + proc.stderr, trials=2)
