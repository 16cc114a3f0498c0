"""Sweep submission: a 100-member sweep on the local SLURM cluster, against plain ``sbatch --array``.

    python bench/sweep.py [--members 100] [--rounds 3] [--json]

Needs root: the repo's 2-node test cluster is brought up with ``tests/slurm/cluster.sh up`` unless it
is already up, and taken down at the end only if this script started it. The cluster must be idle. Client
commands (squeue, sbatch, the launcher's) reach it through the ``SLURM_CONF`` that ``cluster.sh env`` prints.

Per round, in alternating order, each in a fresh directory:

- runner: ``python -m runner -m hydra/launcher=slurm 'trainer.seed=range(N)' trainer.max_steps=0``, the
  product path: Hydra expands the sweep, hydra-submitit-launcher pickles one submission per member and
  submitit sends them all with one ``sbatch --array``. Each member is a dry run: SLURM starts the batch
  script, ``srun`` starts Python, submitit unpickles the launcher, Hydra composes the member's config,
  runner validates it and returns (``trainer.max_steps=0``: no torch, nothing written).
- sbatch: ``sbatch --array=0-(N-1) --wrap true`` with the same resources (1 task, 1 CPU per member).

Timed wall-clock from launching the command, by polling ``squeue`` for the job's unique name (every 10 ms
in the first second, then every 50 ms; every 200 ms once submitted):

- submit_s: until squeue lists all N array tasks. One sbatch creates the whole array at once, so this is
  start-up + sweep expansion + pickling + the sbatch call (target: under 10 s for 100 members);
- all_done_s: until none of the N tasks is pending, running or completing;
- launcher_return_s (runner only): until ``python -m runner -m`` exits. hydra-submitit-launcher does not
  return at submission: it waits for every member (checking result files every second, sacct now and
  then) and collects their results, so this is what a user waits at the prompt;
- per_member_s: (all_done_s - submit_s) / N, the cluster time each member costs once submitted, amortised
  over the members that run at once (the test partition lets each core take up to 4 jobs: 8 members at
  once on 2 CPUs); per_member_vs_sbatch compares it with an empty job's;
- member_wall_s: median over the members of sacct's End - Start (whole seconds: a rough figure), one
  member's own time in the allocation.

NOTE: most of submit_s is Hydra's BasicSweeper composing every member's config in the submitting process
before it launches anything (``Sweeper.validate_batch_is_legal``: about 0.1 s a member on these VMs);
pickling the 100 submissions (86 KB each) and the sbatch call take under 2 s.

Figures are medians over the rounds; ratios are medians of the per-round ratios (runner / sbatch).
Anything this script submitted is cancelled (scancel by job id) on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TARGET_SUBMIT_S = 10.0
ACTIVE = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED"}
# squeue polls: every 10 ms in the first second (sbatch alone takes tens of ms), then every 50 ms.
SUBMIT_POLL_S = (0.01, 0.05)
DONE_POLL_S = 0.2


class BenchError(RuntimeError):
    pass


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER), cmd], capture_output=True, text=True, timeout=timeout)


@contextmanager
def slurm_cluster() -> Iterator[None]:
    """The test cluster, up for the duration; taken down afterwards only if it was not already up."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError("the SLURM test cluster needs root and apt-get (tests/slurm/cluster.sh)")
    was_up = _cluster("status", 60).returncode == 0
    if not was_up:
        print("starting the SLURM test cluster (tests/slurm/cluster.sh up)", file=sys.stderr, flush=True)
        up = _cluster("up", 900)  # a first `up` installs the Debian packages
        if up.returncode != 0:
            _cluster("down", 180)  # whatever part of it came up is ours
            raise BenchError(f"tests/slurm/cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    # NOTE: every client below (and the launcher's sbatch/squeue/sacct) must reach this cluster, not /etc/slurm's.
    exports = [shlex.split(line) for line in _cluster("env", 30).stdout.splitlines()]
    os.environ.update(dict(w[1].split("=", 1) for w in exports if len(w) == 2 and w[0] == "export"))
    try:
        yield
    finally:
        if not was_up:
            print("stopping the SLURM test cluster it started", file=sys.stderr, flush=True)
            _cluster("down", 180)


def squeue(*args: str) -> list[list[str]]:
    """``squeue -h -r -t all`` rows (array tasks one per row, finished jobs included), split on spaces."""
    out = subprocess.run(
        ["squeue", "-h", "-r", "-t", "all", *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def check_idle() -> None:
    busy = [row[0] for row in squeue("-o", "%i %T") if row[1] in ACTIVE]
    if busy:
        raise BenchError(f"the cluster is busy ({len(busy)} jobs: {' '.join(busy[:10])}); the bench needs it idle")


class Submission:
    """One job array under test: launched, watched through squeue, cancelled if anything goes wrong."""

    def __init__(self, kind: str, members: int, workdir: str) -> None:
        self.kind, self.members, self.workdir = kind, members, workdir
        self.name = f"bench-sweep-{os.getpid()}-{kind}-{time.monotonic_ns()}"
        self.array_id: str | None = None
        self.out = open(os.path.join(workdir, f"{kind}.out"), "w")  # noqa: SIM115 (closed in close())
        if kind == "runner":
            cmd = [sys.executable, "-m", "runner", "-m", "hydra/launcher=slurm", f"trainer.seed=range({members})"]
            cmd += ["trainer.max_steps=0", f"hydra.launcher.name={self.name}"]
        else:
            log = os.path.join(workdir, "sbatch-%A_%a.out")
            cmd = ["sbatch", f"--array=0-{members - 1}", "--ntasks=1", "--cpus-per-task=1", f"--job-name={self.name}"]
            cmd += [f"--output={log}", "--wrap", "true"]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=workdir, env=_env(), stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _tasks(self) -> dict[str, str]:
        rows = squeue("--name", self.name, "-o", "%i %T")
        tasks = {row[0]: row[1] for row in rows if "_" in row[0] and "[" not in row[0]}
        if tasks and self.array_id is None:
            self.array_id = next(iter(tasks)).split("_")[0]
        return tasks

    def _check_alive(self, what: str) -> None:
        code = self.proc.poll()
        if code not in (None, 0):
            raise BenchError(f"{self.kind} exited {code} while waiting for {what}:\n{self.output()}")

    def wait_submitted(self, timeout: float) -> float:
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if len(self._tasks()) >= self.members:
                return time.perf_counter() - self.started
            self._check_alive("the submission")
            time.sleep(SUBMIT_POLL_S[time.perf_counter() - self.started > 1.0])
        raise BenchError(f"{self.kind}: the {self.members} array tasks did not appear within {timeout}s")

    def wait_done(self, timeout: float) -> float:
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            tasks = self._tasks()
            if len(tasks) >= self.members and not ACTIVE & set(tasks.values()):
                failed = sorted(t for t, state in tasks.items() if state != "COMPLETED")
                if failed:
                    raise BenchError(f"{self.kind}: {len(failed)} members did not complete: {failed[:5]}")
                return time.perf_counter() - self.started
            self._check_alive("the members to finish")
            time.sleep(DONE_POLL_S)
        raise BenchError(f"{self.kind}: members still running after {timeout}s")

    def wait_exit(self, timeout: float) -> float:
        try:
            code = self.proc.wait(timeout=max(1.0, self.started + timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.kind} did not exit within {timeout}s:\n{self.output()}") from None
        if code != 0:
            raise BenchError(f"{self.kind} exited {code}:\n{self.output()}")
        return time.perf_counter() - self.started

    def member_wall_s(self, timeout: float = 30.0) -> float | None:
        """Median sacct End - Start over the members (accounting records may lag the queue by a moment)."""
        deadline = time.monotonic() + timeout
        while self.array_id is not None and time.monotonic() < deadline:
            out = subprocess.run(
                ["sacct", "-n", "-P", "-X", "-j", self.array_id, "-o", "JobID,Start,End"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            rows = [line.split("|") for line in out.splitlines() if line.strip()]
            walls = []
            for _, start, end in rows:
                if "T" in start and "T" in end:
                    walls.append((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())
            if len(walls) >= self.members:
                return statistics.median(walls)
            time.sleep(0.5)
        return None

    def output(self) -> str:
        self.out.flush()
        text = Path(self.out.name).read_text(errors="replace")
        return text[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        try:
            if self.array_id is None:
                self._tasks()  # submitted just before the failure?
            if self.array_id is not None:  # a no-op once every task has finished
                subprocess.run(["scancel", self.array_id], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:  # not to hide the error that brought us here
            print(f"could not cancel {self.kind} job {self.array_id}: {e}", file=sys.stderr)
        finally:
            self.out.close()


def measure(kind: str, members: int, timeout: float) -> dict[str, float | None]:
    workdir = tempfile.mkdtemp(prefix=f"bench-sweep-{kind}-")
    sub = None
    try:
        check_idle()
        sub = Submission(kind, members, workdir)
        figures: dict[str, float | None] = {"submit_s": sub.wait_submitted(timeout)}
        figures["all_done_s"] = sub.wait_done(timeout)
        if kind == "runner":
            figures["launcher_return_s"] = sub.wait_exit(timeout)
        else:
            sub.wait_exit(timeout)
        figures["per_member_s"] = (figures["all_done_s"] - figures["submit_s"]) / members
        figures["member_wall_s"] = sub.member_wall_s()
        return figures
    finally:
        if sub is not None:
            sub.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run(members: int, rounds: int, timeout: float) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    for r in range(rounds):
        for kind in ("runner", "sbatch") if r % 2 == 0 else ("sbatch", "runner"):
            prefix = "" if kind == "runner" else "sbatch_"
            for key, value in measure(kind, members, timeout).items():
                if value is not None:
                    samples.setdefault(prefix + key, []).append(value)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)

    def ratio(key: str) -> float:
        pairs = zip(samples[key], samples[f"sbatch_{key}"], strict=True)
        return round(statistics.median(a / b for a, b in pairs), 2)

    med = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    figures: dict[str, Any] = {
        "members": members,
        "rounds": rounds,
        "submit_s": med["submit_s"],
        "all_done_s": med["all_done_s"],
        "launcher_return_s": med["launcher_return_s"],
        "per_member_s": med["per_member_s"],
        "member_wall_s": med.get("member_wall_s"),
        "sbatch_submit_s": med["sbatch_submit_s"],
        "sbatch_all_done_s": med["sbatch_all_done_s"],
        "sbatch_per_member_s": med["sbatch_per_member_s"],
        "sbatch_member_wall_s": med.get("sbatch_member_wall_s"),
        "runner_vs_sbatch": ratio("submit_s"),
        "all_done_vs_sbatch": ratio("all_done_s"),
        "per_member_vs_sbatch": ratio("per_member_s"),
        "target": f"submit_s < {TARGET_SUBMIT_S}",
        "target_met": med["submit_s"] < TARGET_SUBMIT_S,
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
    return figures


def table(f: dict[str, Any]) -> str:
    n = f["members"]

    def sec(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    rows = [
        (f"submitted (all {n} tasks in squeue)", f["submit_s"], f["sbatch_submit_s"], f["runner_vs_sbatch"]),
        ("all members done (squeue)", f["all_done_s"], f["sbatch_all_done_s"], f["all_done_vs_sbatch"]),
        ("launcher returned", f["launcher_return_s"], None, None),
        (
            f"per member: (done - submitted) / {n}",
            f["per_member_s"],
            f["sbatch_per_member_s"],
            f["per_member_vs_sbatch"],
        ),
        ("member wall (sacct End - Start)", f["member_wall_s"], f["sbatch_member_wall_s"], None),
    ]
    lines = [f"{n}-member sweep, dry members, local SLURM cluster; seconds, median of {f['rounds']} rounds", ""]
    lines.append(f"| {'from launch until':<38} | {'runner -m':>9} | {'sbatch':>8} | {'runner/sbatch':>13} |")
    lines.append(f"|{'-' * 40}|{'-' * 11}|{'-' * 10}|{'-' * 15}|")
    for name, ours, base, vs in rows:
        lines.append(f"| {name:<38} | {sec(ours):>9} | {sec(base):>8} | {'' if vs is None else vs:>13} |")
    met = "met" if f["target_met"] else "NOT met"
    lines.append(f"\nsubmit_s = {f['submit_s']} ({f['target']}: {met})")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per sweep before giving up")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # so `finally` cancels the jobs and stops the cluster
    try:
        with slurm_cluster():
            figures = run(args.members, args.rounds, args.timeout)
    except BenchError as e:
        raise SystemExit(f"bench/sweep.py: {e}") from None
    except KeyboardInterrupt:
        print("bench/sweep.py: interrupted; what it submitted was cancelled", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(figures) if args.json else table(figures))


if __name__ == "__main__":
    main()
