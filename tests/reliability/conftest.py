"""Reliability suite: every test here carries the ``reliability`` marker; the summary table is printed at the
end of any session that ran some of them.

Size knobs (environment): ``RUNNER_RELIABILITY_TRIALS`` kill trials (default 3, ``nox -s reliability`` uses
25), ``RUNNER_RELIABILITY_FULL=1`` runs every row of the bad-config table, every corruption kind and
every hostile resume path end to end, and the tests marked ``full_suite`` (the SLURM requeue drill)
(default: a fixed sample, to fit the CI budget).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability import summary


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)
    # NOTE: tests marked full_suite are deselected outside the full suite by tests/conftest.py.


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if summary.any_recorded():
        terminalreporter.write_sep("=", "reliability")
        terminalreporter.write_line(summary.table())
        summary.dump()


def trials() -> int:
    return int(os.environ.get("RUNNER_RELIABILITY_TRIALS", "3"))


def full() -> bool:
    return os.environ.get("RUNNER_RELIABILITY_FULL", "") not in ("", "0")
