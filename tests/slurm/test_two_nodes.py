"""Issue 13 acceptance 3 and 4 on the 2-node test cluster (tests/slurm/cluster.sh: nodes n1 and n2).

A sweep member with ``hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=1`` puts rank 0 on n1 and rank 1
on n2 (each node is a slurmd in its own UTS namespace, so ``hostname`` tells them apart); the drill preempts
such a job for real (an exclusive job on the ``urgent`` partition), and the requeued job must end bitwise
identical to an undisturbed 2-node run, with every step's metrics record written exactly once. A job of
2 nodes x 2 ranks resuming from remote storage downloads the checkpoint once per node.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runner.checkpoint.load import read_tensors
from tests.conftest import TINY, run_cli
from tests.s3_server import S3Server, dummy_credentials
from tests.slurm.conftest import ON_CLUSTER, Sweep, wait_for

pytestmark = [*ON_CLUSTER, pytest.mark.dist, pytest.mark.slow]

TWO_NODES = ["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"]
MEMBERS = ["debug=tiny,parallel=ddp", "debug=tiny,parallel=fsdp"]


def _records(run_dir: Path) -> list[dict[str, object]]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _hosts(run_dir: Path) -> dict[int, str]:
    """Global rank -> the node it ran on, from each rank's "process group up" line (the last one: a
    requeued job logs it again)."""
    hosts = {}
    for log in sorted((run_dir / "logs").glob("rank*.log")):
        for rank, host in re.findall(r"process group up: rank (\d+) of 2 \(gloo, slurm\) on (\S+)", log.read_text()):
            hosts[int(rank)] = host
    return hosts


def _members(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("multirun/*/*/.hydra"))


def test_two_node_sweep_ddp_and_fsdp_run_on_n1_and_n2(tmp_path: Path) -> None:
    sweep = Sweep([*TWO_NODES, "parallel=ddp,fsdp", *TINY], tmp_path)
    try:
        assert sweep.wait(timeout=240) == 0, sweep.output()
    finally:
        sweep.close()
    members = _members(tmp_path)
    assert [m.name for m in members] == MEMBERS
    for member in members:
        assert _hosts(member) == {0: "n1", 1: "n2"}, sweep.output()
        manifest = json.loads((member / "checkpoints" / "step_6" / "manifest.json").read_text())
        assert manifest["world_size"] == 2
        assert manifest["replicated"] is member.name.endswith("ddp")
        counts = Counter((r["split"], r["step"]) for r in _records(member) if "step" in r)
        assert counts and max(counts.values()) == 1, counts


STEPS = 300
DRILL = [
    *TINY,
    f"trainer.max_steps={STEPS}",
    f"trainer.eval_every={STEPS}",
    f"trainer.ckpt_every={STEPS}",  # so the only checkpoint before the end is the one saved on the signal
    "trainer.log_every=1",  # a record per step: each must be there exactly once after the requeue
]
SAVED = r"checkpoint saved at step (\d+) on the requeue signal"


def _last_train_step(run_dir: Path) -> int:
    return max((int(str(r["step"])) for r in _records(run_dir) if r.get("split") == "train"), default=0)


def _job_state(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    return out.stdout.strip()


def test_two_node_jobs_preempted_for_real_resume_bitwise(tmp_path: Path) -> None:
    preempted, reference = tmp_path / "preempted", tmp_path / "reference"
    preempted.mkdir()
    reference.mkdir()
    sweep = Sweep([*TWO_NODES, "parallel=ddp,fsdp", *DRILL], preempted)
    undisturbed: Sweep | None = None
    urgent: str | None = None
    try:
        members = lambda: _members(preempted)  # noqa: E731
        wait_for(
            "both members to pass step 20",
            lambda: len(members()) == 2 and all(_last_train_step(m) >= 20 for m in members()),
            240,
            sweep,
        )
        at_signal = {m.name: _last_train_step(m) for m in members()}
        # An exclusive job on both nodes in the higher-priority partition preempts both members (REQUEUE).
        urgent = subprocess.run(
            ["sbatch", "--parsable", "-p", "urgent", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 1"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        wait_for(
            "both members to save on the signal",
            lambda: all(re.search(SAVED, (m / "logs" / "rank0.log").read_text()) for m in members()),
            120,
            sweep,
        )
        # The undisturbed run, submitted once the urgent job holds the nodes (so it cannot be preempted).
        wait_for("the urgent job to start", lambda: _job_state(urgent) in ("RUNNING", "COMPLETED"), 60, sweep)
        undisturbed = Sweep([*TWO_NODES, "parallel=ddp,fsdp", *DRILL], reference)
        t0 = time.monotonic()
        assert sweep.wait(timeout=300) == 0, sweep.output()
        assert undisturbed.wait(timeout=max(30.0, 300 - (time.monotonic() - t0))) == 0, undisturbed.output()
    finally:
        sweep.close()
        if undisturbed is not None:
            undisturbed.close()
        if urgent:
            subprocess.run(["scancel", urgent], capture_output=True, timeout=30)

    assert [m.name for m in _members(preempted)] == [m.name for m in _members(reference)] == MEMBERS
    for member in _members(preempted):
        logs = {rank: (member / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)}
        saved = re.findall(SAVED, logs[0])
        assert len(saved) == 1, logs[0][-3000:]
        step = int(saved[0])
        assert at_signal[member.name] <= step < STEPS
        # Both nodes took part in the save at the signal, and the requeued job resumed from it on both.
        assert "checkpoint saved; waiting for rank 0 to requeue the job" in logs[1]
        files = json.loads((member / "checkpoints" / f"step_{step}" / "manifest.json").read_text())["files"]
        assert {"rank_0.json", "rank_1.json"} <= set(files), files
        assert f"resuming from step {step}" in logs[0], logs[0][-3000:]
        assert f"loaded checkpoint at step {step}" in logs[1], logs[1][-3000:]
        assert _hosts(member) == {0: "n1", 1: "n2"}
        # Every step's record exactly once (the dead job's records past the resumed step are not kept twice)...
        records = _records(member)
        train = [int(str(r["step"])) for r in records if r.get("split") == "train"]
        assert sorted(train) == list(range(1, STEPS + 1)), Counter(train).most_common(3)
        # ... with the same losses as the undisturbed run, and the same final state, tensor for tensor.
        expected_records = _records(reference / member.relative_to(preempted))
        losses = {(r["split"], r["step"]): r["loss"] for r in records if "loss" in r}
        assert losses == {(r["split"], r["step"]): r["loss"] for r in expected_records if "loss" in r}
        final = read_tensors(str(member / "checkpoints" / f"step_{STEPS}"))
        expected = read_tensors(str(reference / member.relative_to(preempted) / "checkpoints" / f"step_{STEPS}"))
        assert final.keys() == expected.keys() and final
        different = [k for k in final if not torch.equal(final[k], expected[k])]
        assert not different, f"{member.name}: tensors differ from the undisturbed run: {different[:5]}"


@pytest.fixture
def s3() -> Iterator[S3Server]:
    """moto on loopback, in this process: the nodes share the machine's network, so jobs on n1 and n2 reach it."""
    server = S3Server()
    with dummy_credentials():  # in os.environ: every Sweep (and so every job) inherits them
        server.start()
        try:
            yield server
        finally:
            server.stop()


def test_a_two_node_job_on_new_machines_downloads_the_remote_checkpoint_once_per_node(
    tmp_path: Path, s3: S3Server
) -> None:
    """Two nodes of two ranks each, resuming from the remote with no local copy: local rank 0 of each node
    (global ranks 0 and 2) downloads, the others wait for it, and all four load the same step."""
    bucket = s3.new_bucket("nodes")
    args = [
        *TINY,
        "name=nodes",
        "storage=s3",
        f"storage.url=s3://{bucket}/runs",
        f"storage.endpoint_url={s3.endpoint}",
        "trainer.batch_size=4",
    ]
    first, second = tmp_path / "first", tmp_path / "second"  # two machines: nothing local in common
    first.mkdir()
    second.mkdir()
    run_cli([*args, "trainer.max_steps=6"], first)  # the checkpoint to resume from (one process is enough)
    four = ["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=2"]
    sweep = Sweep([*four, *args, "trainer.max_steps=9", "trainer.eval_every=9"], second)
    try:
        assert sweep.wait(timeout=240) == 0, sweep.output()
    finally:
        sweep.close()
    (member,) = _members(second)
    logs = {r: (member / "logs" / f"rank{r}.log").read_text() for r in range(4)}
    hosts = {
        int(r): h
        for log in logs.values()
        for r, h in re.findall(r"process group up: rank (\d+) of 4 \S+ \S+ on (\S+)", log)
    }
    assert hosts == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}, hosts
    assert [r for r in range(4) if "downloading checkpoint" in logs[r]] == [0, 2], logs
    assert all("loaded checkpoint at step 6" in logs[r] for r in range(4)), logs
    assert (member / "checkpoints" / "step_9" / "manifest.json").exists()
    assert not list((member / "checkpoints").glob("*.tmp")), "a download left its temporary folder"
