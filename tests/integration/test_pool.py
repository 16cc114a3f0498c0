"""Acceptance 5 of issue 4: ``hydra/launcher=pool`` runs N members at a time on their own slots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def _events(tmp_path: Path) -> list[dict[str, object]]:
    (path,) = tmp_path.glob("multirun/*/.pool/events.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, delta in edges:  # an end at the same instant as a start sorts first (-1 < 1)
        running += delta
        peak = max(peak, running)
    return peak


def test_four_members_two_slots_never_more_than_two_at_once(tmp_path: Path) -> None:
    lrs = "1e-3,2e-3,3e-3,4e-3"
    run_cli(["-m", "hydra/launcher=pool", "hydra.launcher.slots=2", f"opt.lr={lrs}", *TINY], tmp_path, timeout=240)
    events = _events(tmp_path)
    assert sorted(int(str(e["index"])) for e in events) == [0, 1, 2, 3]
    assert all(e["returncode"] == 0 for e in events)
    # The launcher's own record of when each member process started and ended...
    spans = [(float(str(e["start"])), float(str(e["end"]))) for e in events]
    assert _max_overlap(spans) == 2
    # ...and, independently, what the members themselves logged (metrics.jsonl wall-clock times).
    members = sorted(p.parent for p in tmp_path.glob("multirun/*/*/metrics.jsonl"))
    assert len(members) == 4
    logged = []
    for member in members:
        records = [json.loads(line) for line in (member / "metrics.jsonl").read_text().splitlines()]
        times = [r["time"] for r in records if "time" in r]
        logged.append((min(times), max(times)))
        assert any('"step": 6' in line for line in (member / "metrics.jsonl").read_text().splitlines())
    assert _max_overlap(logged) <= 2
    # Members running at the same time held different slots.
    for i, a in enumerate(events):
        for b in events[i + 1 :]:
            overlap = float(str(a["start"])) < float(str(b["end"])) and float(str(b["start"])) < float(str(a["end"]))
            if overlap:
                assert not set(a["slots"]) & set(b["slots"])  # type: ignore[arg-type]


def test_a_failing_member_is_reported_with_its_log_and_the_others_finish(tmp_path: Path) -> None:
    # NOTE: a member that fails while it runs (its loss diverges; trainer.on_nonfinite=stop): a bad value
    # such as opt.lr=-1 no longer gets that far, the sweep is rejected before launching (test_cli.py).
    proc = run_cli(
        ["-m", "hydra/launcher=pool", "hydra.launcher.slots=2", "opt.lr=1e-3,1e30,2e-3", *TINY],
        tmp_path,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 1
    events = {int(str(e["index"])): e for e in _events(tmp_path)}
    assert sorted(events) == [0, 1, 2]
    assert events[0]["returncode"] == 0 and events[2]["returncode"] == 0
    assert events[1]["returncode"] != 0
    failed_log = str(events[1]["log_path"])
    assert "non-finite loss" in Path(failed_log).read_text()  # the member's own error is in its log
    # One line naming the member, the reason and its log; no traceback, no Hydra report.
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: sweep member #1 (opt.lr=1e+30 +debug=tiny) failed: non-finite loss")
    assert f"(log: {failed_log})" in errors[0]
    finished = [p.parent.parent.name for p in tmp_path.glob("multirun/*/*/checkpoints/step_6")]
    assert sorted(finished) == ["debug=tiny,opt.lr=0.001", "debug=tiny,opt.lr=0.002"]
