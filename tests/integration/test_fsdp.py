"""Issue 13, acceptance 1 and 2: FSDP2 runs resume bitwise after a kill, and their sharded checkpoints load
exactly at another world size or parallelism (and the other way round), and export."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runner.checkpoint.load import read_tensors
from runner.train.metrics import read_metrics
from tests.conftest import REPO, TINY, cli_env
from tests.helpers.dist import start, stop, torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# A constant schedule, so a run can be extended; checkpoints every 4 steps, logs every 2.
ARGS = [*TINY, "parallel=fsdp", "sched=const", "trainer.max_steps=16", "trainer.ckpt_every=4", "trainer.eval_every=8"]


def _runner(args: list[str], cwd: Path, nproc: int) -> str:
    if nproc > 1:
        return torchrun(["runner", *args], cwd, nproc=nproc).stdout
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _losses(run_dir: Path) -> dict[tuple[str, int], float]:
    return {(r["split"], r["step"]): r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def test_a_killed_fsdp_run_resumes_bitwise_identically(tmp_path: Path) -> None:
    torchrun(["runner", *ARGS, "name=straight"], tmp_path)
    run_dir = tmp_path / "outputs" / "killed"
    proc = start(["runner", *ARGS, "name=killed"], tmp_path, log=tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step_8" / "manifest.json").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.02)
    finally:
        stop(proc)  # SIGKILL to torchrun and both ranks
    manifest = json.loads((run_dir / "checkpoints" / "step_8" / "manifest.json").read_text())
    assert manifest["replicated"] is False and manifest["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", "rank_0.json", "rank_1.json"} <= set(manifest["files"])  # per-rank shards
    rerun = torchrun(["runner", *ARGS, "name=killed"], tmp_path).stdout
    assert "resuming from step" in rerun
    straight = tmp_path / "outputs" / "straight"
    _same(
        read_tensors(str(straight / "checkpoints" / "step_16")), read_tensors(str(run_dir / "checkpoints" / "step_16"))
    )
    assert _losses(straight) == _losses(run_dir)


def test_sharded_and_replicated_checkpoints_load_exactly_across_world_sizes(tmp_path: Path) -> None:
    """FSDP at 2 ranks -> FSDP at 1 and DDP at 1 and 2; DDP at 2 -> FSDP at 2; each loads the saved tensors."""
    short = [a for a in ARGS if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=4"]
    torchrun(["runner", *short, "name=fsdp2"], tmp_path)
    torchrun(["runner", *[a for a in short if a != "parallel=fsdp"], "name=ddp2"], tmp_path)
    fsdp2 = str(tmp_path / "outputs" / "fsdp2" / "checkpoints" / "step_4")
    ddp2 = str(tmp_path / "outputs" / "ddp2" / "checkpoints" / "step_4")
    check = ["tests.helpers.resumed_state"]
    cases = [
        (fsdp2, ["parallel=fsdp"], 1),
        (fsdp2, [], 1),
        (fsdp2, [], 2),
        (ddp2, ["parallel=fsdp"], 2),
    ]
    for i, (source, extra, nproc) in enumerate(cases):
        args = [*check, source, *TINY, "sched=const", f"name=load{i}", *extra]
        if nproc > 1:
            out = torchrun(args, tmp_path, nproc=nproc).stdout
        else:
            proc = subprocess.run(
                [sys.executable, "-m", *args], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180
            )
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, out
        assert "compared 128 tensors, 0 differ" in out, (source, extra, nproc, out[-2000:])
        if nproc == 1:  # saved by 2 ranks: one line about the data position
            assert out.count("was saved by 2 ranks and loads into 1") == 1, out[-2000:]

    # And the export of the sharded checkpoint is exactly its model weights.
    out = tmp_path / "model.safetensors"
    subprocess.run([sys.executable, "-m", "runner.export", fsdp2, str(out)], cwd=REPO, env=cli_env(), check=True)
    from safetensors.torch import load_file

    exported = load_file(str(out))
    saved = read_tensors(fsdp2, prefix="model.")
    _same({f"model.{k}": v for k, v in exported.items()}, saved)


def test_a_damaged_shard_of_one_rank_is_named_and_skipped(tmp_path: Path) -> None:
    """The reliability promise for sharded checkpoints: a flipped byte in rank 1's shard of the newest
    checkpoint is found while loading, named, and the previous checkpoint is used; the run still finishes."""
    short = [a for a in ARGS if not a.startswith("trainer.max_steps")]
    torchrun(["runner", *short, "trainer.max_steps=8", "name=damaged"], tmp_path)
    shard = tmp_path / "outputs" / "damaged" / "checkpoints" / "step_8" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = torchrun(["runner", *short, "trainer.max_steps=12", "name=damaged"], tmp_path).stdout
    assert "skipping checkpoint" in out and "__1_0.distcp" in out, out[-3000:]
    assert "resuming from step 4" in out, out[-3000:]
    assert (tmp_path / "outputs" / "damaged" / "checkpoints" / "step_12" / "manifest.json").exists()
