"""tests/slurm/cluster.sh itself: two nodes, its clients found through SLURM_CONF, and never touching a
daemon it did not start (issue 11: the old script replaced another cluster's config and ports)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.conftest import CLUSTER, ON_CLUSTER

pytestmark = ON_CLUSTER


def _cluster(cmd: str, state: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if state is not None:
        env["RUNNER_SLURM_DIR"] = str(state)
    return subprocess.run(["bash", str(CLUSTER), cmd], capture_output=True, text=True, timeout=timeout, env=env)


def _pids(status: str) -> dict[str, int]:
    """``<daemon>: running (pid N)`` lines of ``cluster.sh status``."""
    return {d: int(p) for d, p in re.findall(r"^(\S+): running \(pid (\d+)\)$", status, re.MULTILINE)}


def _ports(path: Path) -> set[int]:
    return {int(line.split("=")[1]) for line in path.read_text().split()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _processes_of(state: Path) -> list[int]:
    """Live processes whose command line or environment names ``state``: what a cluster there started."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"{state}/".encode() in text and _alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def _srun_hostnames(env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        ["srun", "-N2", "--ntasks-per-node=1", "hostname"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    return sorted(out.stdout.split())


def test_up_is_idempotent_and_status_env_and_srun_see_two_nodes(slurm_cluster: dict[str, str]) -> None:
    up = _cluster("up")
    assert up.returncode == 0 and "starting" not in up.stderr, up.stderr  # already up: starts nothing
    status = _cluster("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"^node n1: (idle|mixed|allocated|completing)$", status.stdout, re.MULTILINE), status.stdout
    assert re.search(r"^node n2: (idle|mixed|allocated|completing)$", status.stdout, re.MULTILINE), status.stdout
    conf = slurm_cluster["SLURM_CONF"]
    assert _cluster("env").stdout.strip() == f"export SLURM_CONF={conf}"
    assert os.environ["SLURM_CONF"] == conf and conf.endswith("/etc/slurm.conf") and conf != "/etc/slurm/slurm.conf"
    assert _srun_hostnames() == ["n1", "n2"]


@pytest.fixture
def decoys(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def test_down_never_stops_a_daemon_it_did_not_start(tmp_path: Path, decoys: list[subprocess.Popen[bytes]]) -> None:
    """A state dir whose pid files name processes it did not start: the session cluster's own daemons (the
    right command names, another state dir), a process named like a daemon, and one that names this state
    dir but has the wrong command name. ``down`` must leave every one of them running."""
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    (state / "munge").mkdir()
    others = _pids(_cluster("status").stdout)
    assert {"slurmctld", "slurmd.n1", "slurmdbd"} <= others.keys(), others
    sleep = tmp_path / "mariadbd"  # a process whose command name is mariadbd, but not ours
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleep)
    decoys.append(subprocess.Popen([str(sleep), "300"]))
    decoys.append(subprocess.Popen(["bash", "-c", "sleep 300", f"{state}/munge"]))  # ours by path, not by name
    pidfiles = {
        state / "run" / "slurmctld.pid": others["slurmctld"],
        state / "run" / "slurmd.n1.pid": others["slurmd.n1"],
        state / "run" / "slurmdbd.pid": others["slurmdbd"],
        state / "run" / "mariadbd.pid": decoys[0].pid,
        state / "munge" / "munged.pid": decoys[1].pid,
    }
    for path, pid in pidfiles.items():
        path.write_text(f"{pid}\n")
    assert _cluster("status", state).returncode != 0  # none of them counts as this state dir's
    down = _cluster("down", state)
    assert down.returncode == 0, down.stderr
    assert "stopping" not in down.stderr, down.stderr
    assert all(_alive(pid) for pid in pidfiles.values())
    assert _cluster("status").returncode == 0  # the session cluster is untouched


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state dir for a second cluster, taken down at the end: under /tmp, since munged (user munge) cannot
    enter pytest's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="runner-slurm-second-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        # NOTE: whatever a failed assertion left running goes down before its pid files go away.
        _cluster("down", path)
        shutil.rmtree(path, ignore_errors=True)


def test_a_second_cluster_comes_up_beside_this_one_and_leaves_it_alone(state_dir: Path) -> None:
    """Issue 11: the test cluster started while another cluster is up must neither fail nor touch it; and a
    failed ``up`` stops whatever it started (here the last daemon, n2's slurmd, cannot open its log)."""
    state = state_dir
    (state / "log" / "slurmd.n2.log").mkdir(parents=True)
    failed = _cluster("up", state, timeout=300)
    assert failed.returncode != 0 and "up failed" in failed.stderr and "last lines of" in failed.stderr, failed.stderr
    assert "stopping what it started: munged mariadbd slurmdbd slurmctld slurmd.n1 slurmd.n2" in failed.stderr
    assert not _processes_of(state), failed.stderr
    assert _cluster("status").returncode == 0
    (state / "log" / "slurmd.n2.log").rmdir()
    try:
        up = _cluster("up", state, timeout=300)
        assert up.returncode == 0, up.stderr
        conf = _cluster("env", state).stdout.strip().removeprefix("export SLURM_CONF=")
        assert conf == f"{state}/etc/slurm.conf" != os.environ["SLURM_CONF"]
        first = Path(os.environ["SLURM_CONF"]).parent.parent / "ports"
        assert not _ports(state / "ports") & _ports(first)
        assert _srun_hostnames({**os.environ, "SLURM_CONF": conf}) == ["n1", "n2"]
        assert _cluster("status").returncode == 0
    finally:
        down = _cluster("down", state)
    assert down.returncode == 0, down.stderr
    assert not _pids(_cluster("status", state).stdout)
    assert _cluster("status").returncode == 0, "the first cluster did not survive the second one's down"
    assert _srun_hostnames() == ["n1", "n2"]
