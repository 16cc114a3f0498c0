"""Object-store faults, kills during a sync and corruption on S3: the real CLI against moto behind a
fault-injecting proxy (tests/fault_proxy.py explains why a proxy).

Every run here is watched while it trains: whenever a committed local checkpoint disappears (local
retention), the remote must already hold a checkpoint at that step or a newer one ("local copies are kept
until the remote confirms"). At the end the remote tree equals the local tree, names and checksums.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from runner.checkpoint.load import read_tensors
from runner.checkpoint.manifest import verify
from runner.storage import LocalStorage, checksum
from tests.conftest import IN_CI, cli_env
from tests.fault_proxy import FaultProxy
from tests.helpers.inproc import run_cli_here
from tests.helpers.runs import committed_steps
from tests.reliability import summary
from tests.reliability.conftest import full
from tests.s3_server import S3Server, dummy_credentials, local_tree, remote_steps, remote_tree, s3_args

#: The default session runs the erroring-store case and one damage kind (to stay in its time budget); the
#: outages, the slow link and the kills mid-upload run in the full suite (``full_suite`` marker).
if not IN_CI:
    pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the test extra) to run the S3 tests")

pytestmark = [pytest.mark.s3]

ROW_SYNC_KILL, ROW_S3_CORRUPT, ROW_STORE = summary.ROWS[9:12]
# ~0.1 s a step (acceptance 3 of issue 3 uses the same shape): long enough for faults to overlap training.
SHAPE = ["+debug=tiny", "sched=const", "data.image_size=32", "model.patch_size=4", "trainer.batch_size=64"]
STEPS = 40
ARGS = [*SHAPE, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=5", "trainer.eval_every=100", "name=fault"]
WAIT_S = 180.0  # generous bound for anything a run is expected to reach


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with dummy_credentials():
        srv = S3Server()
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


@pytest.fixture
def proxy(server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(server.port, seed=5) as p:
        yield p


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run, local only: what every faulted run must end bitwise equal to."""
    root = tmp_path_factory.mktemp("reference")
    run_cli_here([*ARGS, f"hydra.run.dir={root / 'run'}"], cwd=root)
    return read_tensors(str(root / "run" / "checkpoints" / f"step_{STEPS}"))


def assert_remote_checkpoints_complete(server: S3Server, bucket: str) -> None:
    """No remote checkpoint exposes a manifest whose data is missing, short or different."""
    objects = server.objects(bucket, "runs/")
    for key in objects:
        if not re.search(r"/checkpoints/step_\d+/manifest\.json$", key):
            continue
        folder = key.rsplit("/", 1)[0]
        manifest = json.loads(server.read(bucket, f"runs/{key}"))
        for name, info in manifest["files"].items():
            rel = f"{folder}/{name}"
            assert rel in objects, f"remote manifest {key} names {name}, which is not on the remote"
            assert objects[rel] == int(info["size"]), f"remote {rel} is incomplete"
            data = server.read(bucket, f"runs/{rel}")
            assert checksum.of_bytes(data, checksum.algorithm_of(info["checksum"])) == info["checksum"], rel


class Watched:
    """A run of the CLI in the background, checked at every poll for "no local copy dropped too early"."""

    def __init__(self, args: list[str], run_dir: Path, log: Path, server: S3Server, bucket: str) -> None:
        self.run_dir, self.log, self.server, self.bucket = run_dir, log, server, bucket
        self.seen: set[int] = set()
        self.dropped: set[int] = set()
        out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", *args, f"hydra.run.dir={run_dir}"],
            cwd=run_dir.parent,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def poll(self) -> None:
        local = committed_steps(self.run_dir)
        remote = remote_steps(self.server, self.bucket)  # read after the local listing: never older
        gone = self.seen - local
        newest_remote = max(remote, default=-1)
        early = sorted(s for s in gone if s > newest_remote)
        assert not early, f"local checkpoints {early} were deleted before the remote held them ({remote})"
        self.dropped |= gone
        self.seen = (self.seen | local) - gone

    def until(self, cond: Callable[[], bool], what: str) -> bool:
        """Poll until ``cond`` or the run ends (bounded); True if ``cond`` held."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            self.poll()
            if cond():
                return True
            if self.proc.poll() is not None:
                return cond()
            time.sleep(0.05)
        raise AssertionError(f"waited {WAIT_S}s for {what}:\n{self.text()[-3000:]}")

    def finish(self) -> int:
        self.until(lambda: self.proc.poll() is not None, "the run to finish")
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def watched() -> Iterator[list[Watched]]:
    runs: list[Watched] = []
    yield runs
    for run in runs:  # by PID, whatever the test did
        run.kill()


def run_name(run_dir: Path) -> str:
    return str(yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["name"])


def assert_converged(
    run: Watched, reference: dict[str, torch.Tensor] | None, earlier: set[str] | None = None, steps: int = STEPS
) -> None:
    """Finished, remote tree == local tree, every remote checkpoint complete, bitwise equal weights.

    ``earlier``: remote keys an earlier (killed) process of the same run left. NOTE: remote retention
    deletes only checkpoints the current process wrote, so that process's older checkpoints stay, and its
    TensorBoard file too once the local run directory is gone; the remote must then hold the local tree
    exactly, plus only files from that earlier process (checkpoints older than any local one).
    """
    out = run.text()
    assert steps in committed_steps(run.run_dir), out[-3000:]
    assert verify(LocalStorage(str(run.run_dir)), f"checkpoints/step_{steps}")[0] is not None
    prefix = f"runs/{run_name(run.run_dir)}/"
    local, remote = local_tree(run.run_dir), remote_tree(run.server, run.bucket, prefix)
    if earlier is not None:
        assert {k: remote.get(k) for k in local} == local
        oldest_local = min(committed_steps(run.run_dir))
        extra = sorted(remote.keys() - local.keys())
        assert set(extra) <= earlier, f"remote files neither local nor from the killed process: {extra}"
        found = [m for k in extra if (m := re.match(r"checkpoints/step_(\d+)/", k))]
        assert all(int(m.group(1)) < oldest_local for m in found), extra
    else:
        assert remote == local
    assert steps in remote_steps(run.server, run.bucket)
    assert_remote_checkpoints_complete(run.server, run.bucket)
    if reference is None:
        return
    got = read_tensors(str(run.run_dir / "checkpoints" / f"step_{steps}"))
    assert got.keys() == reference.keys()
    for key in reference:
        assert torch.equal(got[key], reference[key]), key


# --------------------------------------------------------------------------- object-store faults
@pytest.mark.full_suite
def test_unreachable_at_start_trains_warns_and_converges(
    tmp_path: Path, server: S3Server, proxy: FaultProxy, watched: list[Watched], reference: dict[str, torch.Tensor]
) -> None:
    bucket = server.new_bucket("down")
    proxy.mode = "down"
    run = Watched([*ARGS, *s3_args(proxy.endpoint, bucket)], tmp_path / "run", tmp_path / "out.log", server, bucket)
    watched.append(run)
    failed = run.until(lambda: "SYNC FAILED" in run.text() or "final sync to" in run.text(), "a sync warning")
    assert failed, run.text()[-3000:]
    run.until(lambda: bool(committed_steps(run.run_dir)), "a local checkpoint while the remote is down")
    assert not remote_steps(server, bucket)
    proxy.mode = "pass"
    assert run.finish() == 0, run.text()[-3000:]
    assert_converged(run, reference)
    summary.case(ROW_STORE)


@pytest.mark.full_suite
def test_unreachable_at_start_with_history_on_the_remote_never_overwrites_it(
    tmp_path: Path, server: S3Server, proxy: FaultProxy, watched: list[Watched]
) -> None:
    # A first process of the run put its checkpoints on the remote.
    bucket = server.new_bucket("history")
    args = [*ARGS, *s3_args(proxy.endpoint, bucket)]
    first = Watched(args, tmp_path / "first", tmp_path / "first.log", server, bucket)
    watched.append(first)
    assert first.finish() == 0, first.text()[-3000:]
    before = {key: server.read(bucket, f"runs/{key}") for key in server.objects(bucket, "runs/")}
    # The same command on a new machine (no local copy) during an outage that ends once training started.
    proxy.mode = "down"
    second = Watched(args, tmp_path / "second", tmp_path / "second.log", server, bucket)
    watched.append(second)
    second.until(lambda: "could not look for checkpoints" in second.text(), "the resume lookup to give up")
    proxy.mode = "pass"
    assert second.finish() != 0, second.text()[-3000:]
    out = second.text()
    assert "starting fresh" in out and f"holds checkpoints of this run up to step {STEPS}" in out, out[-3000:]
    after = {key: server.read(bucket, f"runs/{key}") for key in server.objects(bucket, "runs/")}
    assert after == before, "the run overwrote checkpoints it never saw"
    assert STEPS in committed_steps(second.run_dir), "the run's own work must stay on local disk"
    # Once the store answers, the same command continues from the remote's newest checkpoint.
    third = run_cli_here([*args, f"hydra.run.dir={tmp_path / 'third'}"], tmp_path)
    assert f"resuming from step {STEPS} (checkpoint s3://" in third.stdout + third.stderr
    summary.case(ROW_STORE)


@pytest.mark.full_suite
def test_unreachable_mid_run_keeps_local_copies_and_converges(
    tmp_path: Path, server: S3Server, proxy: FaultProxy, watched: list[Watched]
) -> None:
    bucket = server.new_bucket("mid")
    # A longer run (so the outage lands while it trains, even on a loaded machine); no bitwise comparison.
    args = [*ARGS, *s3_args(proxy.endpoint, bucket), "trainer.max_steps=250", "trainer.ckpt_every=10"]
    run = Watched(args, tmp_path / "run", tmp_path / "out.log", server, bucket)
    watched.append(run)
    run.until(lambda: bool(remote_steps(server, bucket)), "a first checkpoint on the remote")
    proxy.mode = "down"
    assert "finished at step" not in run.text(), "training ended before the outage: the case tested nothing"
    run.until(lambda: "SYNC FAILED" in run.text() or "final sync to" in run.text(), "a sync warning")
    assert "SYNC FAILED" in run.text() or "final sync to" in run.text(), run.text()[-3000:]
    proxy.mode = "pass"
    assert run.finish() == 0, run.text()[-3000:]
    assert_converged(run, None, steps=250)
    summary.case(ROW_STORE)


def test_erroring_store_retries_and_converges(
    tmp_path: Path, server: S3Server, proxy: FaultProxy, watched: list[Watched], reference: dict[str, torch.Tensor]
) -> None:
    bucket = server.new_bucket("err")
    # A third of all requests get a 503 SlowDown / 500 InternalError, up to 40 of them (so the run converges).
    proxy.mode, proxy.error_rate, proxy.error_budget = "errors", 0.33, 40
    run = Watched([*ARGS, *s3_args(proxy.endpoint, bucket)], tmp_path / "run", tmp_path / "out.log", server, bucket)
    watched.append(run)
    assert run.finish() == 0, run.text()[-3000:]
    assert proxy.injected > 0, "no error was injected: the case tested nothing"
    assert_converged(run, reference)
    summary.case(ROW_STORE)


@pytest.mark.full_suite
def test_slow_uploads_never_drop_an_unconfirmed_local_copy(
    tmp_path: Path, server: S3Server, proxy: FaultProxy, watched: list[Watched], reference: dict[str, torch.Tensor]
) -> None:
    bucket = server.new_bucket("slow")
    proxy.mode, proxy.bytes_per_s = "slow", 400 << 10  # a tiny checkpoint (~1 MB) takes seconds to upload
    run = Watched([*ARGS, *s3_args(proxy.endpoint, bucket)], tmp_path / "run", tmp_path / "out.log", server, bucket)
    watched.append(run)
    assert run.finish() == 0, run.text()[-3000:]
    assert proxy.puts_done, "nothing went through the slow link"
    assert_converged(run, reference)
    summary.case(ROW_STORE)


# --------------------------------------------------------------------------- kills during a sync
def _uploading_checkpoint_data(proxy: FaultProxy) -> bool:
    return any("/checkpoints/step_" in k and not k.endswith("/manifest.json") for k in set(proxy.puts_in_flight))


@pytest.mark.full_suite
@pytest.mark.parametrize("lose_local", [False, True], ids=["same-dir", "machine-lost"])
def test_sigkill_while_uploading_a_checkpoint_resumes_bitwise_identically(
    tmp_path: Path,
    server: S3Server,
    proxy: FaultProxy,
    watched: list[Watched],
    reference: dict[str, torch.Tensor],
    lose_local: bool,
) -> None:
    bucket = server.new_bucket("kill")
    proxy.mode, proxy.bytes_per_s = "slow", 300 << 10
    args = [*ARGS, *s3_args(proxy.endpoint, bucket)]
    run = Watched(args, tmp_path / "run", tmp_path / "out.log", server, bucket)
    watched.append(run)
    # Let one checkpoint reach the remote first, then kill in the middle of the next checkpoint upload.
    run.until(lambda: bool(remote_steps(server, bucket)), "a first checkpoint on the remote")
    before = remote_steps(server, bucket)
    in_flight = run.until(
        lambda: _uploading_checkpoint_data(proxy) and remote_steps(server, bucket) == before,
        "a checkpoint data upload in flight",
    )
    assert in_flight, "the run finished before a second checkpoint upload could be interrupted"
    run.kill()
    proxy.mode = "pass"
    time.sleep(0.5)  # let the proxy notice the dead client and drop its half-read request
    assert_remote_checkpoints_complete(server, bucket)
    remote_now = remote_steps(server, bucket)
    assert remote_now, "the first remote checkpoint is gone"

    earlier = set(server.objects(bucket, f"runs/{run_name(run.run_dir)}/"))
    local_now = committed_steps(run.run_dir)
    if lose_local:
        shutil.rmtree(run.run_dir)
        expect = max(remote_now)
    else:
        expect = max(local_now | remote_now)
    rerun = Watched(args, tmp_path / "run", tmp_path / "rerun.log", server, bucket)
    watched.append(rerun)
    assert rerun.finish() == 0, rerun.text()[-3000:]
    assert f"resuming from step {expect} " in rerun.text(), rerun.text()[-3000:]
    # A folder whose upload was cut off has no manifest: skipping it with a warning is right; anything
    # else (a manifest whose data does not verify) would be a torn checkpoint exposed on the remote.
    skipped = [line for line in rerun.text().splitlines() if "skipping checkpoint" in line]
    assert all("no manifest.json" in line for line in skipped), skipped
    assert_converged(rerun, reference, earlier=earlier)
    summary.case(ROW_SYNC_KILL)


# --------------------------------------------------------------------------- corruption on S3
DAMAGES = ["truncated", "flipped_byte", "no_manifest", "malformed_manifest", "missing_file"]
DAMAGES_RUN = DAMAGES if full() else ["flipped_byte"]
SMALL = ["+debug=tiny", "sched=const", "trainer.ckpt_every=2", "trainer.eval_every=100", "name=corrupt"]


@pytest.fixture(scope="module")
def remote_source(server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """A bucket holding a 4-step run with checkpoints 2 and 4, and the weights of a straight 6-step run."""
    root = tmp_path_factory.mktemp("s3corrupt")
    bucket = server.new_bucket("src")
    run_cli_here(
        [*SMALL, "trainer.max_steps=4", *s3_args(server.endpoint, bucket), f"hydra.run.dir={root / 'a'}"], root
    )
    assert remote_steps(server, bucket) == {2, 4}
    run_cli_here([*SMALL, "trainer.max_steps=6", f"hydra.run.dir={root / 'straight'}"], root)
    return bucket, read_tensors(str(root / "straight" / "checkpoints" / "step_6"))


def damage_remote(server: S3Server, bucket: str, folder: str, how: str) -> str:
    """Damage the remote checkpoint ``folder`` (a key prefix); returns the file the warning must name."""
    client = server.client()
    names = sorted(k.rsplit("/", 1)[-1] for k in server.objects(bucket, folder + "/"))
    data_file = next(n for n in names if n.endswith(".distcp"))
    key = f"{folder}/{data_file}"
    if how == "truncated":
        body = server.read(bucket, key)
        client.put_object(Bucket=bucket, Key=key, Body=body[: len(body) // 2])
        return data_file
    if how == "flipped_byte":
        body = bytearray(server.read(bucket, key))
        body[len(body) // 3] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        return data_file
    if how == "no_manifest":
        client.delete_object(Bucket=bucket, Key=f"{folder}/manifest.json")
        return "manifest.json"
    if how == "malformed_manifest":
        client.put_object(Bucket=bucket, Key=f"{folder}/manifest.json", Body=b'{"format": "runner-checkpoint/1", "f')
        return "manifest.json"
    client.delete_object(Bucket=bucket, Key=key)  # missing_file: the manifest names an absent object
    return data_file


@pytest.mark.parametrize("how", DAMAGES_RUN)
def test_damaged_remote_checkpoint_is_skipped_when_resuming_from_s3(
    tmp_path: Path, server: S3Server, remote_source: tuple[str, dict[str, torch.Tensor]], how: str
) -> None:
    source, straight = remote_source
    bucket = server.new_bucket("dmg")
    client = server.client()
    for key in server.objects(source):
        client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": source, "Key": key})
    name = damage_remote(server, bucket, "runs/corrupt/checkpoints/step_4", how)
    run_dir = tmp_path / "run"  # no local copy: the resume must look remotely
    proc = run_cli_here(
        [*SMALL, "trainer.max_steps=6", *s3_args(server.endpoint, bucket), f"hydra.run.dir={run_dir}"], tmp_path
    )
    out = proc.stdout + proc.stderr
    warning = next((line for line in out.splitlines() if "skipping checkpoint" in line), "")
    assert f"s3://{bucket}/runs/corrupt/checkpoints/step_4" in warning and name in warning, out[-3000:]
    assert "resuming from step 2 " in out, out[-3000:]
    got = read_tensors(str(run_dir / "checkpoints" / "step_6"))
    assert got.keys() == straight.keys()
    for key in straight:
        assert torch.equal(got[key], straight[key]), key
    summary.case(ROW_S3_CORRUPT)
