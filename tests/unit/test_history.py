"""A run's history across resumes (runner/history.py): rewound to the resumed step, fetched before appending."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner import history
from runner.storage import Entry, LocalStorage


def _write(path: Path, records: list[dict[str, object]], torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def _steps(path: Path) -> list[tuple[str, int]]:
    return [(r["split"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_rewind_drops_records_past_the_resumed_step_and_torn_lines(tmp_path: Path) -> None:
    records = [{"split": "train", "step": s, "loss": 1.0 / s} for s in (10, 20, 30, 40)]
    records += [{"split": "eval", "step": 20, "top1": 0.5}, {"split": "hparams", "hparams": {}, "metrics": {}}]
    _write(tmp_path / "metrics.jsonl", records, torn='{"split": "train", "st')
    assert history.rewind(str(tmp_path), 20) == 4  # steps 30, 40, the hparams record, the torn line
    assert _steps(tmp_path / "metrics.jsonl") == [("train", 10), ("train", 20), ("eval", 20)]
    assert history.rewind(str(tmp_path), 20) == 0  # idempotent
    assert history.rewind(str(tmp_path / "nowhere"), 5) == 0


def test_rewind_to_a_fresh_start_drops_everything(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.jsonl", [{"split": "train", "step": 10}])
    history.rewind(str(tmp_path), 0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def _remote(tmp_path: Path) -> LocalStorage:
    remote = tmp_path / "remote"
    _write(remote / "metrics.jsonl", [{"split": "train", "step": 10}, {"split": "train", "step": 20}])
    (remote / "tb").mkdir()
    (remote / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"events")
    (remote / "logs").mkdir()
    for rank in (0, 1):
        (remote / "logs" / f"rank{rank}.log").write_text(f"rank {rank} before\n")
    (remote / "checkpoints" / "step_20").mkdir(parents=True)
    (remote / "checkpoints" / "step_20" / "manifest.json").write_text("{}")
    (remote / ".hydra").mkdir()
    (remote / ".hydra" / "config.yaml").write_text("old: config\n")
    (remote / "metrics.jsonl.replaced-20260101-000000").write_text("{}\n")
    return LocalStorage(str(remote))


def test_fetch_on_a_new_machine_brings_each_rank_its_own_history_and_nothing_else(tmp_path: Path) -> None:
    remote = _remote(tmp_path)
    run0, run1 = tmp_path / "node0", tmp_path / "node1"
    assert sorted(history.fetch(remote, str(run0), rank=0, replace=False)) == [
        "logs/rank0.log",
        "metrics.jsonl",
        "tb/events.out.tfevents.1.host.1.0",
    ]
    assert history.fetch(remote, str(run1), rank=1, replace=False) == ["logs/rank1.log"]
    assert (run1 / "logs" / "rank1.log").read_text() == "rank 1 before\n"
    assert not (run0 / "checkpoints").exists() and not (run0 / ".hydra").exists()


def test_fetch_keeps_local_history_unless_the_run_resumes_from_the_remote(tmp_path: Path) -> None:
    remote = _remote(tmp_path)
    run = tmp_path / "run"
    _write(run / "metrics.jsonl", [{"split": "train", "step": 10}])  # this machine's copy
    assert "metrics.jsonl" not in history.fetch(remote, str(run), rank=0, replace=False)
    assert _steps(run / "metrics.jsonl") == [("train", 10)]
    # The remote holds a newer checkpoint than this machine: its history is the run's newest.
    assert "metrics.jsonl" in history.fetch(remote, str(run), rank=0, replace=True)
    assert _steps(run / "metrics.jsonl") == [("train", 10), ("train", 20)]


def test_fetch_from_an_unreadable_remote_is_an_error_not_a_silent_fresh_history(tmp_path: Path) -> None:
    class Down(LocalStorage):
        def listing(self, path: str = "") -> dict[str, Entry]:
            raise ConnectionError("connection refused")

    with pytest.raises(history.HistoryError, match=r"could not read this run's history .* connection refused"):
        history.fetch(Down(str(tmp_path)), str(tmp_path / "run"), rank=0, replace=True)
