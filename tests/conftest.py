"""Shared test helpers: run the real CLI in a subprocess, read what a run wrote."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """A test's prerequisite is missing: under CI=true that fails the test (CI must run every test, never
    skip one); on a developer's machine it skips."""
    if IN_CI:
        pytest.fail(f"{reason}; CI must run this test")
    pytest.skip(reason)


def require(module: str, reason: str) -> ModuleType:
    """``module``, imported; if it is missing, :func:`unavailable` (a failure under CI, a skip elsewhere)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        unavailable(f"{module} is not installed: {reason}")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Subprocesses import this checkout's runner, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``python -m runner *args`` in ``cwd``; on unexpected failure the output is in the assertion."""
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"runner {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


TINY = ["+debug=tiny"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``full_suite`` run only in the full reliability suite. (SLURM tests share one xdist
    worker through their own marks: tests/slurm/conftest.py ON_CLUSTER.)"""
    # NOTE: deselected, not skipped: too slow for the default session, and the full suite must run them.
    if os.environ.get("RUNNER_RELIABILITY_FULL", "") in ("", "0"):
        slow = [item for item in items if item.get_closest_marker("full_suite")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("full_suite")]


_BUSY: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Seconds each pytest-xdist worker spent in tests (setup + call + teardown), summed on the controller."""
    node = getattr(report, "node", None)
    worker = getattr(getattr(node, "gateway", None), "id", None) or "main"
    _BUSY[worker] = _BUSY.get(worker, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The busiest worker sets the wall time (SLURM tests all run on one): CI prints the balance."""
    if _BUSY:
        busy = ", ".join(f"{worker} {seconds:.0f} s" for worker, seconds in sorted(_BUSY.items()))
        terminalreporter.write_line(f"time in tests per worker: {busy}")


@pytest.fixture(scope="session", autouse=True)
def installed() -> None:
    """What the entry point does before composing: schemas, resolvers, the YAML alias guard."""
    from runner.config import install

    install()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
