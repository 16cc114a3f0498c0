"""The local 2-node SLURM cluster (tests/slurm/cluster.sh) for tests marked ``slurm``, and helpers to drive
sweeps on it.

The cluster is brought up once per session and taken down at the end unless it was already up (then it
belongs to someone else). Under CI it must come up: a failure is a test error, never a skip.
"""

from __future__ import annotations

import os
import re
import shlex
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

#: The marks of every test that runs on the test cluster: the session's one cluster, and one pytest-xdist
#: worker for all of them (--dist loadgroup), so no test's jobs meet another's (an urgent job preempts all).
ON_CLUSTER = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"), pytest.mark.usefixtures("slurm_cluster")]


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER), cmd], capture_output=True, text=True, timeout=timeout)


def _exports(text: str) -> dict[str, str]:
    """``export K=V`` lines (as ``cluster.sh env`` prints them, shell-quoted) as a dict."""
    env = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """The 2-node cluster (n1, n2), up for the session; its client variables (``SLURM_CONF``) are set in
    ``os.environ``, so this process and every subprocess it starts (``cli_env`` copies it, submitit's
    sbatch/squeue/sacct/scancel inherit it) talk to this cluster and never to another one on the machine."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable("the SLURM test cluster needs root and apt-get (tests/slurm/cluster.sh)")
    was_up = _cluster("status", 60).returncode == 0
    saved: dict[str, str | None] = {}
    try:
        up = _cluster("up", 900)
        if up.returncode != 0:  # NOTE: inside the try: whatever came up is taken down below
            pytest.fail(f"tests/slurm/cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        env = _exports(_cluster("env", 30).stdout)
        if "SLURM_CONF" not in env:
            pytest.fail("tests/slurm/cluster.sh env printed no SLURM_CONF")
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
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
