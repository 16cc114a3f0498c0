"""Faults on local disk: a full disk during a save, a non-finite loss, damaged checkpoints found on resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runner.checkpoint.load import read_tensors
from runner.checkpoint.manifest import verify
from runner.storage import LocalStorage
from runner.train.metrics import read_metrics
from tests.conftest import run_cli, unavailable
from tests.helpers.inproc import run_cli_here
from tests.reliability import summary
from tests.reliability.conftest import full

ROW_CORRUPT, ROW_FAULT = summary.ROWS[5], summary.ROWS[6]
TINY = ["+debug=tiny", "trainer.eval_every=100"]


def one_line_error(stderr: str) -> str:
    """Our one ``error: ...`` line. NOTE: with a full disk, DCP's writer threads also print their own
    tracebacks, concurrently, so our line may start mid-line after theirs; it is still exactly one line."""
    found = re.findall(r"error: [^\n]*", stderr)
    assert len(found) == 1, stderr[-3000:]
    return found[0]


# --------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted in teardown (needs root; outside CI a refusal to mount skips)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        unavailable(f"cannot mount a tmpfs for the disk-full test (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Leave only ``leave_bytes`` free on ``disk`` (less than one tiny checkpoint, ~650 KB)."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def test_disk_full_save_fails_loudly_and_keeps_the_previous_checkpoint(small_disk: Path, tmp_path: Path) -> None:
    run_dir = small_disk / "run"
    run_cli_here([*TINY, "trainer.max_steps=3", "trainer.ckpt_every=3", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    before = read_tensors(str(run_dir / "checkpoints" / "step_3"))
    filler = fill(small_disk, 256 << 10)

    # Default trainer.on_save_error=fail: the save at step 4 hits ENOSPC.
    proc = run_cli(
        [*TINY, "trainer.max_steps=6", "trainer.ckpt_every=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_line_error(proc.stderr)
    assert "step 4" in line and "No space left on device" in line and "trainer.on_save_error=warn" in line, line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_3"], "partial files left behind"
    assert verify(LocalStorage(str(run_dir)), "checkpoints/step_3")[0] is not None
    after = read_tensors(str(run_dir / "checkpoints" / "step_3"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    summary.case(ROW_FAULT)

    # trainer.on_save_error=warn: saves at 4 and 5 fail with a warning, training goes on; the final save of
    # the run still fails loudly (its work would otherwise be lost without a word).
    proc = run_cli(
        [
            *TINY,
            "trainer.max_steps=6",
            "trainer.ckpt_every=1",
            "trainer.on_save_error=warn",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    warned = [line for line in proc.stdout.splitlines() if "training continues without it" in line]
    assert len(warned) == 2 and "step 4" in warned[0] and "step 5" in warned[1], proc.stdout[-3000:]
    assert "step 6" in one_line_error(proc.stderr)
    trained = [r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["split"] == "train"]
    assert max(trained) == 6, trained
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_3"]
    summary.case(ROW_FAULT)

    # Space comes back: the same command resumes from the intact step 3 and finishes.
    filler.unlink()
    proc = run_cli_here(
        [*TINY, "trainer.max_steps=6", "trainer.ckpt_every=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path
    )
    assert "resuming from step 3 " in proc.stdout
    assert verify(LocalStorage(str(run_dir)), "checkpoints/step_6")[0] is not None
    summary.case(ROW_FAULT)


# --------------------------------------------------------------------------- non-finite
# AdamW moves each weight by about lr per step whatever the gradient: lr=1e30 makes step 2's loss non-finite.
BLOW_UP = [*TINY, "opt.lr=1e30", "trainer.grad_clip_norm=0", "trainer.max_steps=6", "trainer.ckpt_every=100"]


def test_nonfinite_stop_saves_the_last_good_state_and_exits_nonzero(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*BLOW_UP, f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_line_error(proc.stderr)
    assert "non-finite loss or gradients at step 2" in line and "trainer.on_nonfinite=skip" in line, line
    assert "trainer.on_nonfinite=stop: saving the last good state (step 1)" in proc.stdout
    saved = read_tensors(str(run_dir / "checkpoints" / "step_1"))
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    summary.case(ROW_FAULT)


def test_nonfinite_skip_counts_and_never_applies_a_bad_update(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli_here([*BLOW_UP, "trainer.on_nonfinite=skip", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    skipped = [line for line in proc.stdout.splitlines() if "update skipped" in line]
    assert len(skipped) == 5 and "step 2:" in skipped[0] and "5 skipped so far" in skipped[-1], proc.stdout[-3000:]
    final = read_tensors(str(run_dir / "checkpoints" / "step_6"))
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    records = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["split"] == "train"]
    assert records[-1]["step"] == 6 and records[-1]["skipped_steps"] == 5
    rank0 = json.loads((run_dir / "checkpoints" / "step_6" / "rank_0.json").read_text())
    assert rank0["skipped_steps"] == 5
    summary.case(ROW_FAULT)


# --------------------------------------------------------------------------- corruption, end to end
DAMAGES = ["truncated", "flipped_byte", "no_manifest", "malformed_manifest", "missing_file", "empty_dir"]
# The fast suite runs one kind end to end; tests/unit/test_checkpoint.py checks all six in-process anyway.
DAMAGES_RUN = DAMAGES if full() else ["truncated"]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    run_cli_here([*TINY, "trainer.max_steps=4", "trainer.ckpt_every=2", f"hydra.run.dir={root / 'run'}"], cwd=root)
    return root / "run"


def _distcp(folder: Path) -> Path:
    return next(p for p in sorted(folder.iterdir()) if p.suffix == ".distcp")


def damage(folder: Path, how: str) -> str:
    """Damage ``folder`` in place; returns the file name the warning must mention."""
    if how == "truncated":
        target = _distcp(folder)
        os.truncate(target, target.stat().st_size // 2)
        return target.name
    if how == "flipped_byte":
        target = _distcp(folder)
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0x01
        target.write_bytes(bytes(data))
        return target.name
    if how == "no_manifest":
        (folder / "manifest.json").unlink()
        return "manifest.json"
    if how == "malformed_manifest":
        (folder / "manifest.json").write_text('{"format": "runner-checkpoint/1", "files": ')
        return "manifest.json"
    if how == "missing_file":
        target = _distcp(folder)
        target.unlink()
        return target.name
    shutil.rmtree(folder)
    folder.mkdir()
    return "manifest.json"


@pytest.mark.parametrize("how", DAMAGES_RUN)
def test_damaged_newest_checkpoint_is_skipped_on_resume(two_checkpoints: Path, tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    name = damage(run_dir / "checkpoints" / "step_4", how)
    proc = run_cli_here(
        [*TINY, "trainer.max_steps=6", "trainer.ckpt_every=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    warning = next((line for line in out.splitlines() if "skipping checkpoint" in line), "")
    assert "step_4" in warning and name in warning, out[-3000:]
    assert "resuming from step 2 " in proc.stdout
    assert verify(LocalStorage(str(run_dir)), "checkpoints/step_6")[0] is not None
    summary.case(ROW_CORRUPT)


def test_explicitly_named_damaged_checkpoint_is_an_error(two_checkpoints: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    damage(run_dir / "checkpoints" / "step_4", "flipped_byte")
    target = run_dir / "checkpoints" / "step_4"
    proc = run_cli(
        [*TINY, f"trainer.resume={target}", f"hydra.run.dir={tmp_path / 'other'}"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_line_error(proc.stderr)
    assert f"trainer.resume={target} is not a valid checkpoint" in line and "checksum" in line, line
    summary.case(ROW_CORRUPT)
