"""Issue 3's acceptance runs: the real CLI (`python -m runner +debug=tiny storage=s3 ...`) against moto.

Runs that are killed, or whose exit code or timing is the point, are processes of their own; the others go
through the entry in this process (tests/helpers/inproc.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from runner.checkpoint.load import read_tensors
from runner.train.metrics import read_metrics
from tests.conftest import REPO, TINY, cli_env, run_cli
from tests.gated_data import ENV as GATES
from tests.helpers.dist import torchrun
from tests.helpers.inproc import run_cli_here
from tests.helpers.runs import committed_steps
from tests.s3_server import S3Server, local_tree, remote_steps, remote_tree, s3_args

pytestmark = [pytest.mark.s3, pytest.mark.slow]

EVERY_S = 1.0


def run_name(run_dir: Path) -> str:
    return str(yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["name"])


def commit_times(run_dir: Path) -> dict[int, float]:
    """step -> wall time its checkpoint was committed (its manifest's mtime; the rename keeps it)."""
    out = {}
    for step in committed_steps(run_dir):
        with contextlib.suppress(FileNotFoundError):  # retired between the listing and the stat
            out[step] = (run_dir / "checkpoints" / f"step_{step}" / "manifest.json").stat().st_mtime
    return out


def remote_arrivals(server: S3Server, bucket: str) -> dict[int, float]:
    """step -> wall time the server stored its manifest (S3 LastModified)."""
    out = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/"):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/manifest.json") and "/checkpoints/step_" in key:
                out[int(key.split("/")[-2][5:])] = obj["LastModified"].timestamp()
    return out


def popen_cli(args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args], cwd=cwd, env=cli_env(env), stdout=out, stderr=subprocess.STDOUT
    )


def final_weights(run_dir: Path, step: int) -> dict[str, object]:
    return read_tensors(str(run_dir / "checkpoints" / f"step_{step}"))


def assert_bitwise_equal(a: dict[str, object], b: dict[str, object]) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # type: ignore[arg-type]


# --------------------------------------------------------------------------- acceptance 1
def test_checkpoints_appear_remotely_within_an_interval_and_trees_match(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """Acceptance 1, and 4 on the same run: planted credentials appear in no output, file or object."""
    secret, token = f"planted-{uuid.uuid4().hex}", f"token-{uuid.uuid4().hex}"
    run_dir = tmp_path / "run"
    # NOTE: 400 steps (about 14 s on an idle machine, 35 ms a step) so the run outlasts one interval plus
    # slack by several checkpoints even when nothing else is running; 60 tiny steps took only 2 s there.
    args = [
        *TINY,
        *s3_args(s3_server.endpoint, bucket),
        "data.image_size=32",
        "model.patch_size=4",
        "trainer.batch_size=64",
        "trainer.max_steps=400",
        "trainer.ckpt_every=20",
        "trainer.eval_every=200",
        f"hydra.run.dir={run_dir}",
    ]
    planted = {"AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token}
    proc = popen_cli(args, REPO, tmp_path / "out.log", env=planted)
    # NOTE: times come from the files and objects themselves (manifest mtime, S3 LastModified), not from
    # when this loop saw them: on a loaded machine one polling round can take seconds.
    seen_local: dict[int, float] = {}
    seen_remote: dict[int, float] = {}
    try:
        while proc.poll() is None:
            for step, t in commit_times(run_dir).items():
                seen_local.setdefault(step, t)
            for step, t in remote_arrivals(s3_server, bucket).items():
                seen_remote.setdefault(step, t)
            time.sleep(0.1)
        ended = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    output = (tmp_path / "out.log").read_text()
    assert proc.returncode == 0, output
    # Checkpoints are retired quickly (keep_latest_k), so "it appeared" means: this step or a newer one
    # was stored remotely within one interval (+ slack for a pass's own duration on a loaded 2-core
    # machine, + 1 s for LastModified's resolution) of the local commit.
    slack = 4.0 + 1.0
    judged = [s for s, t in seen_local.items() if t < ended - EVERY_S - slack]
    assert judged, f"the run was too short to observe the sync while it ran ({seen_local})"
    for step in judged:
        arrivals = [t for s, t in seen_remote.items() if s >= step]
        assert arrivals and min(arrivals) - seen_local[step] <= EVERY_S + slack, (step, seen_local, seen_remote)
    name = run_name(run_dir)
    assert remote_tree(s3_server, bucket, f"runs/{name}/") == local_tree(run_dir)
    assert committed_steps(run_dir) == {380, 400}  # keep_latest_k=2 locally, once uploads are confirmed
    assert "final sync" in output
    sync_records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if r.get("split") == "sync"]
    assert sync_records and {"lag_s", "bytes", "mb_per_s"} <= sync_records[-1].keys()
    assert any(r["bytes"] > 0 for r in sync_records)

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in files) and (run_dir / ".hydra" / "config.yaml").exists()
    for value in (secret.encode(), token.encode()):
        assert value not in (tmp_path / "out.log").read_bytes()  # stdout and stderr
        for p in files:
            assert value not in p.read_bytes(), p
        for key in s3_server.objects(bucket):
            assert value not in s3_server.read(bucket, key), key


# --------------------------------------------------------------------------- acceptance 2
def test_resume_from_remote_after_losing_the_machine_is_bitwise_identical(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    # NOTE: a constant LR schedule: a cosine one depends on max_steps, so "the same command with more
    # steps" would legitimately train differently from an uninterrupted 12-step run.
    run_dir = tmp_path / "run"
    args = [*TINY, "sched=const", *s3_args(s3_server.endpoint, bucket), f"hydra.run.dir={run_dir}"]
    first = run_cli_here([*args, "trainer.max_steps=6"], REPO)
    name = run_name(run_dir)
    shutil.rmtree(run_dir)  # The machine (and its scratch disk) is gone.
    second = run_cli_here([*args, "trainer.max_steps=12"], REPO)
    said = second.stdout + second.stderr
    assert f"resuming from step 6 (checkpoint s3://{bucket}/runs/{name}/checkpoints/step_6)" in said, said
    assert "downloading checkpoint" in said

    straight = tmp_path / "straight"
    run_cli_here([*TINY, "sched=const", "trainer.max_steps=12", f"hydra.run.dir={straight}"], REPO)
    assert_bitwise_equal(final_weights(run_dir, 12), final_weights(straight, 12))
    assert first.returncode == 0


def _train_steps(metrics: bytes) -> list[int]:
    """The steps of the train records of a metrics.jsonl, in file order (duplicates kept)."""
    return [r["step"] for r in map(json.loads, metrics.decode().splitlines()) if r.get("split") == "train"]


def test_a_resume_on_a_new_machine_keeps_every_metrics_record_once(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    """Issue 11, acceptance 1: the history of a run survives losing the machine, twice, with a replay between.

    100 steps; then 140 steps killed at step 115 (its records of 101-115 are past its last checkpoint, and the
    remote holds them); then, on a new machine, the same command: it resumes from the remote's checkpoint.
    Local and remote metrics.jsonl must each hold steps 10-140 exactly once.
    """
    run_dir, batch = tmp_path / "run", 8
    stop = tmp_path / "never-opened"
    args = [*TINY, *s3_args(s3_server.endpoint, bucket), "data._target_=tests.gated_data.gated_splits"]
    args += ["trainer.log_every=10", "trainer.ckpt_every=20", "trainer.eval_every=1000", f"hydra.run.dir={run_dir}"]
    run_cli_here([*args, "trainer.max_steps=100"], REPO)
    name = run_name(run_dir)
    remote_metrics = f"runs/{name}/metrics.jsonl"
    assert _train_steps(s3_server.read(bucket, remote_metrics)) == list(range(10, 101, 10))

    shutil.rmtree(run_dir)  # a new machine: the run resumes from the remote's step 100, and pauses at 115
    proc = popen_cli([*args, "trainer.max_steps=140"], REPO, tmp_path / "killed.log", {GATES: f"{15 * batch}:{stop}"})
    try:
        deadline = time.monotonic() + 120
        while not (
            Path(f"{stop}.reached").exists()
            and 120 not in remote_steps(s3_server, bucket)
            and 110 in _train_steps(s3_server.read(bucket, remote_metrics))
        ):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.1)
        proc.kill()  # at step 115: its checkpoint is 100, its records go to 110 (remote and local)
    finally:
        proc.kill()
        proc.wait()
    assert max(remote_steps(s3_server, bucket)) == 100

    shutil.rmtree(run_dir)  # and the machine is lost again
    resumed = run_cli_here([*args, "trainer.max_steps=140"], REPO)
    want = list(range(10, 141, 10))
    assert _train_steps((run_dir / "metrics.jsonl").read_bytes()) == want
    assert _train_steps(s3_server.read(bucket, remote_metrics)) == want
    evals = [r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["split"] == "eval"]
    assert evals == [100, 140]
    # The first line a resumed run prints says where it resumes from (before the download, which follows).
    said = resumed.stdout.splitlines()
    assert said and f"resuming from step 100 (checkpoint s3://{bucket}/runs/{name}/checkpoints/step_100)" in said[0]


def test_remote_retention_bounds_a_run_across_its_requeues(tmp_path: Path, s3_server: S3Server, bucket: str) -> None:
    # Each requeue is a new process of the same run; the checkpoints earlier processes uploaded are the
    # run's own, so keep_latest_k bounds them too (the one a process resumed from is kept while it runs).
    run_dir = tmp_path / "run"
    args = [*TINY, *s3_args(s3_server.endpoint, bucket), "trainer.keep_latest_k=1", f"hydra.run.dir={run_dir}"]
    for steps in (6, 12, 18):
        done = run_cli_here([*args, f"trainer.max_steps={steps}"], REPO)
        assert done.returncode == 0, done.stdout + done.stderr
    said = done.stdout + done.stderr
    assert "resuming from step 12" in said, said
    assert remote_steps(s3_server, bucket) == {12, 18}
    assert committed_steps(run_dir) == {18}


def test_resume_from_a_named_remote_checkpoint(tmp_path: Path, s3_server: S3Server, bucket: str) -> None:
    source = tmp_path / "source"
    run_cli_here([*TINY, *s3_args(s3_server.endpoint, bucket), "trainer.max_steps=6", f"hydra.run.dir={source}"], REPO)
    url = f"s3://{bucket}/runs/{run_name(source)}/checkpoints/step_3"
    other = tmp_path / "other"
    proc = run_cli_here(
        [
            *TINY,
            f"storage.endpoint_url={s3_server.endpoint}",
            # NOTE: quoted: the run name (from the overrides) contains '=', which Hydra's grammar needs quoted.
            f"trainer.resume='{url}'",
            "trainer.max_steps=6",
            f"hydra.run.dir={other}",
        ],
        REPO,
    )
    assert f"resuming from step 3 (checkpoint {url})" in proc.stdout + proc.stderr
    assert_bitwise_equal(final_weights(other, 6), final_weights(source, 6))


# --------------------------------------------------------------------------- acceptance 3
def test_outage_mid_run_training_continues_and_final_sync_catches_up(tmp_path: Path, own_server: S3Server) -> None:
    """Stop the server after a checkpoint reached it; training goes on; restart it; the final sync catches up.

    The run's pace is the test's (tests/gated_data.py), not the machine's: training pauses after step 20
    until the server is down, and after step 50 until it is back, so each phase happens whatever the speed.
    """
    server = own_server
    bucket = server.new_bucket("outage")
    run_dir = tmp_path / "run"
    log = tmp_path / "out.log"
    down, back = tmp_path / "server-down", tmp_path / "server-back"
    batch = 8
    args = [*TINY, *s3_args(server.endpoint, bucket), "data._target_=tests.gated_data.gated_splits"]
    args += [f"trainer.batch_size={batch}", "trainer.max_steps=60", "trainer.ckpt_every=10", "trainer.eval_every=30"]
    gates = {"RUNNER_TEST_GATES": f"{20 * batch}:{down},{50 * batch}:{back}"}
    proc = popen_cli([*args, f"hydra.run.dir={run_dir}"], REPO, log, env=gates)

    def wait_for(what: str, done: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert proc.poll() is None, f"run ended before {what}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
            time.sleep(0.05)

    try:
        wait_for("step 20", Path(f"{down}.reached").exists)
        wait_for("a checkpoint on the remote", lambda: bool(remote_steps(server, bucket)))
        server.stop()
        at_stop = max(committed_steps(run_dir))
        down.touch()
        wait_for("step 50", Path(f"{back}.reached").exists)
        wait_for("a SYNC FAILED warning", lambda: "SYNC FAILED" in log.read_text())
        trained_during_outage = max(committed_steps(run_dir)) > at_stop
        server.start()  # Same port, empty: a fresh bucket.
        server.client().create_bucket(Bucket=bucket)
        back.touch()
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert trained_during_outage, log.read_text()
    assert committed_steps(run_dir) == {50, 60}
    assert remote_tree(server, bucket, f"runs/{run_name(run_dir)}/") == local_tree(run_dir)


def test_failed_final_sync_exits_non_zero(tmp_path: Path, s3_server: S3Server) -> None:
    from tests.helpers.ports import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_cli(
        [
            *TINY,
            "storage=s3",
            "storage.url=s3://nowhere/runs",
            f"storage.endpoint_url={dead}",
            "storage.sync_every=1h",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        REPO,
        check=False,
    )
    assert proc.returncode != 0
    assert "SyncError: final sync of" in proc.stderr
    assert committed_steps(tmp_path / "run") == {3, 6}, "nothing may be deleted locally that is not remote"


# --------------------------------------------------------------------------- two ranks, remote-only resume
@pytest.mark.dist
def test_two_ranks_resume_from_the_remote_with_one_download(tmp_path: Path, s3_server: S3Server) -> None:
    """A requeue onto a new node: no local copy, two ranks. One download per node, both ranks resume."""
    bucket = s3_server.new_bucket("ddp")
    args = [*TINY, *s3_args(s3_server.endpoint, bucket, every="1h"), "trainer.batch_size=4", "name=ddp"]
    torchrun(["runner", *args, "trainer.max_steps=6"], tmp_path)
    run_dir = tmp_path / "outputs" / "ddp"
    shutil.rmtree(run_dir)
    out = torchrun(
        ["runner", *args, "trainer.max_steps=9", "trainer.eval_every=9", "trainer.ckpt_every=9"], tmp_path
    ).stdout
    assert f"resuming from step 6 (checkpoint s3://{bucket}/runs/ddp/checkpoints/step_6)" in out, out[-3000:]
    logs = {r: (run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1)}
    assert [r for r in (0, 1) if "downloading checkpoint" in logs[r]] == [0], logs
    assert all("loaded checkpoint at step 6" in logs[r] for r in (0, 1)), logs
    assert 9 in committed_steps(run_dir)
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a download left its temporary folder"
