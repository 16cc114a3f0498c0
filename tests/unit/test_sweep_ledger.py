"""The sweep ledger (runner/sweep/ledger.py) and the commands that read it, in-process (issue 14)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from runner.sweep import __main__ as cli
from runner.sweep import commands, ledger
from runner.sweep.report import ranked, report, swept
from tests.conftest import require

STEPS = 40


def _member(sweep_dir: str, i: int, barrier: object, ready: float) -> None:
    overrides = [f"opt.lr={i}e-3", "+debug=tiny"]
    ledger.append(sweep_dir, overrides, "started", index=i, name=f"m{i}", total=STEPS, job_id=f"7_{i}")
    for step in range(1, STEPS + 1):
        ledger.append(sweep_dir, overrides, "progress", step=step)
    barrier.wait()  # type: ignore[attr-defined]
    ledger.append(sweep_dir, overrides, "finished", objective=i / 10, step=STEPS)


def test_eight_members_finishing_in_the_same_second_leave_eight_intact_records(tmp_path: Path) -> None:
    """Acceptance 4: 8 processes write their last events at the same instant; every record is whole."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_member, args=(str(tmp_path), i, barrier, time.time())) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = ledger.read(str(tmp_path))
    assert [r.index for r in records] == list(range(8))
    ends = [r.end for r in records]
    assert all(e is not None for e in ends)
    assert max(ends) - min(ends) < 1.0  # type: ignore[type-var,operator]
    for i, r in enumerate(records):
        assert (r.state, r.step, r.total, r.objective, r.job_id, r.name) == (
            "COMPLETED",
            STEPS,
            STEPS,
            i / 10,
            f"7_{i}",
            f"m{i}",
        )
    for path in (tmp_path / ".ledger").glob("*.jsonl"):
        lines = path.read_text().splitlines()
        assert len(lines) == STEPS + 2 and all(json.loads(line) for line in lines)


def test_a_torn_last_line_is_skipped_and_the_record_folds(tmp_path: Path) -> None:
    ledger.append(str(tmp_path), ["a=1"], "submitted", index=0, job_id="5_0")
    ledger.append(str(tmp_path), ["a=1"], "started", index=0, total=10)
    ledger.append(str(tmp_path), ["a=1"], "progress", step=4)
    (path,) = (tmp_path / ".ledger").glob("*.jsonl")
    with open(path, "a") as f:
        f.write('{"event": "progress", "st')  # a writer killed mid-line
    (r,) = ledger.read(str(tmp_path))
    assert (r.state, r.step, r.total, r.job_id) == ("RUNNING", 4, 10, "5_0")


def test_sacct_marks_a_member_that_died_without_writing(tmp_path: Path) -> None:
    ledger.append(str(tmp_path), ["a=1"], "started", index=0, job_id="9_0", total=10)
    ledger.append(str(tmp_path), ["a=2"], "started", index=1, job_id="9_1", total=10)
    records = ledger.correct_from_sacct(
        str(tmp_path), ledger.read(str(tmp_path)), {"9_0": ("CANCELLED", None), "9_1": ("RUNNING", None)}
    )
    assert [(r.state, r.exit_reason) for r in records] == [("CANCELLED", "slurm: CANCELLED"), ("RUNNING", None)]
    assert [r.state for r in ledger.read(str(tmp_path))] == ["CANCELLED", "RUNNING"]  # kept in the ledger


def test_a_local_member_whose_process_is_gone_is_lost(tmp_path: Path) -> None:
    proc = mp.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start()
    proc.join()
    ledger.append(str(tmp_path), ["a=1"], "started", index=0, total=10, pid=proc.pid)
    ledger.append(str(tmp_path), ["a=2"], "started", index=1, total=10)  # this process: alive
    records = ledger.correct_local(str(tmp_path), ledger.read(str(tmp_path)))
    assert [r.state for r in records] == ["LOST", "RUNNING"]


def _fake_sweep(tmp_path: Path, finished: int = 3) -> Path:
    sweep = tmp_path / "sweep"
    for i, lr in enumerate(["1e-3", "3e-3", "1e-2"]):
        overrides = [f"opt.lr={lr}", "model.depth=2", "+debug=tiny"]
        run_dir = sweep / f"m{i}"
        run_dir.mkdir(parents=True)
        ledger.append(str(sweep), overrides, "submitted", index=i, job_id=None)
        ledger.append(str(sweep), overrides, "started", index=i, name=f"m{i}", run_dir=str(run_dir), total=6)
        with open(run_dir / "metrics.jsonl", "w") as f:
            for step in range(2, 7, 2) if i < finished else (2,):
                f.write(json.dumps({"step": step, "split": "train", "loss": 3 - step * 0.1 * (i + 1)}) + "\n")
                f.write(json.dumps({"step": step, "split": "eval", "top1": step * 0.02 * (i + 1)}) + "\n")
        ledger.append(str(sweep), overrides, "progress", step=6 if i < finished else 2)
        if i < finished:
            ledger.append(str(sweep), overrides, "finished", objective=[0.2, 0.5, 0.3][i])
    ledger.write_sweep_info(
        str(sweep), {"task": ["opt.lr=1e-3,3e-3,1e-2", "model.depth=2", "+debug=tiny"], "hydra": [], "cwd": "/x"}
    )
    return sweep


def test_status_table_json_and_not_a_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _fake_sweep(tmp_path, finished=2)
    assert cli.main(["status", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "3 members (2 completed, 1 running)" in out
    rows = {line.split()[1]: line.split()[2:5] for line in out.splitlines()[3:]}
    assert rows["m1"] == ["COMPLETED", "6/6", "0.5000"] and rows["m2"] == ["RUNNING", "2/6", "-"]
    assert cli.main(["status", "--json", str(sweep)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["state"] for d in data] == ["COMPLETED", "COMPLETED", "RUNNING"]
    assert cli.main(["status", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a sweep directory" in err[0]


def test_report_ranks_by_objective_and_draws_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require("matplotlib", "pip install 'runner[report]' to draw report.png")
    sweep = _fake_sweep(tmp_path)
    records = ledger.read(str(sweep))
    assert swept(records) == ["opt.lr"]  # model.depth and +debug are the same for all: not shown
    text, written = report(str(sweep), records)
    lines = text.splitlines()
    assert lines[0].split() == ["rank", "#", "opt.lr", "eval", "top-1", "state", "step"]
    assert lines[2].split()[:4] == ["1", "1", "3e-3", "0.5000"]
    best = max(records, key=lambda r: r.objective or 0)
    assert written["best"].key == best.key == ranked(records)[0].key
    assert Path(written["png"]).stat().st_size > 10_000
    assert "| 1 | 1 | 3e-3 | 0.5000 |" in Path(written["md"]).read_text()


def test_report_works_on_a_running_sweep(tmp_path: Path) -> None:
    require("matplotlib", "pip install 'runner[report]' to draw report.png")
    sweep = _fake_sweep(tmp_path, finished=1)
    text, written = report(str(sweep), ledger.read(str(sweep)))
    assert "RUNNING" in text and Path(written["png"]).exists()


def test_resume_of_a_complete_sweep_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _fake_sweep(tmp_path)
    assert cli.main(["resume", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "all 3 members" in out and "nothing submitted" in out


def test_resubmission_relaunches_the_sweep_for_the_chosen_members(tmp_path: Path) -> None:
    info = {
        "task": ["opt.lr=1,2", "+debug=tiny"],
        "hydra": ["hydra/launcher=slurm", "hydra.sweep.dir=old", "hydra.launcher.wait=false", "hydra.mode=MULTIRUN"],
        "launcher": "hydra_plugins.runner_slurm.slurm_launcher.RunnerSlurmLauncher",
        "python": "py",
    }
    cmd = commands.resubmit_command(info, str(tmp_path), ["k1", "k2"])
    assert cmd == [
        "py",
        "-m",
        "runner",
        "-m",
        "hydra/launcher=slurm",
        "opt.lr=1,2",
        "+debug=tiny",
        f"hydra.sweep.dir='{tmp_path}'",
        "hydra.sweeper.only=[k1,k2]",
        "hydra.launcher.wait=false",
    ]


def test_resume_refuses_a_member_whose_config_changed(tmp_path: Path) -> None:
    from runner.__main__ import CONFIG_DIR

    ledger.append(str(tmp_path), ["opt.lr=0.001", "+debug=tiny"], "started", index=0, total=6)
    ledger.append(str(tmp_path), ["opt.lr=0.001", "+debug=tiny"], "configured", config_hash="0" * 16)
    with pytest.raises(commands.SweepError, match=r"member #0 .*config changed since it started"):
        commands.check_compatible(ledger.read(str(tmp_path)), CONFIG_DIR)


def test_watch_stops_once_every_member_has_ended(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _fake_sweep(tmp_path)
    assert cli.main(["status", "--watch", "0.1", str(sweep)]) == 0
    assert "3 members (3 completed)" in capsys.readouterr().out
