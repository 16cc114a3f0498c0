"""The local SLURM cluster (tests/slurm/cluster.sh) for tests marked ``slurm``, and helpers to drive sweeps on it.

The cluster is brought up once per session and taken down at the end unless it was already up (then it
belongs to someone else). Under CI it must come up: a failure is a test error, never a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, unavailable

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER), cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable("the SLURM test cluster needs root and apt-get (tests/slurm/cluster.sh)")
    was_up = _cluster("status", 60).returncode == 0
    up = _cluster("up", 900)
    if up.returncode != 0:
        pytest.fail(f"tests/slurm/cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    try:
        yield
    finally:
        if not was_up:
            _cluster("down", 180)


class Sweep:
    """``python -m runner -m ...`` in its own process group; ``close()`` kills it and cancels its jobs."""

    def __init__(self, args: Sequence[str], cwd: Path) -> None:
        self.cwd = cwd
        self.out = open(cwd / "sweep.out", "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "-m", *args],
            cwd=cwd,
            env=cli_env(),
            stdout=self.out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def job_ids(self) -> list[str]:
        """SLURM ids of this sweep's members (from submitit's folders: ``<array>_<index>``)."""
        names = {p.name for p in self.cwd.glob("multirun/*/.submitit/*") if re.fullmatch(r"\d+(_\d+)?", p.name)}
        arrays = {n.split("_")[0] for n in names if "_" in n}
        return sorted(n for n in names if n not in arrays)  # an array's own folder is not a job

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"sweep did not finish within {timeout}s:\n{self.output()}") from None

    def output(self) -> str:
        self.out.flush()
        logs = "".join(
            f"\n---- {p}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.cwd.glob("multirun/*/.submitit/*/*.out"))
        )
        return (self.cwd / "sweep.out").read_text(errors="replace") + logs

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        ids = self.job_ids()
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
        self.out.close()


def wait_for(what: str, predicate: object, timeout: float, sweep: Sweep, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        if sweep.proc.poll() is not None:
            raise AssertionError(f"sweep exited ({sweep.proc.returncode}) while waiting for {what}:\n{sweep.output()}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{sweep.output()}")
