"""Hostile input: escaping paths, secrets, malformed YAML and overrides, crafted checkpoint files.

Pickled payloads in DCP metadata and in DCP entries are covered in tests/unit/test_checkpoint.py; this file
adds what reaches the runner from the command line, the environment and the checkpoint's other files.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import pytest

from runner.checkpoint.manifest import newest_valid
from runner.checkpoint.save import Checkpointer
from runner.checkpoint.state import decode
from runner.storage import LocalStorage
from tests.conftest import run_cli
from tests.helpers.state import make_state, train_steps
from tests.reliability import summary
from tests.reliability.conftest import full

ROW = summary.ROWS[7]


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- paths
@pytest.mark.parametrize(
    "name", ["..", "a/../../b", "/etc/cron.d/x", ".hidden", "x/y", "ok..", "n" * 250, "a\nb"], ids=repr
)
def test_run_names_cannot_escape_the_run_root(tmp_path: Path, name: str) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = run_cli(["+debug=tiny", f"name={name}"], cwd=workdir, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "name" in one_line_error(proc.stderr)  # "a\nb" is already refused by Hydra's override parser
    assert list(workdir.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    summary.case(ROW)


@pytest.mark.parametrize("target", ["/etc", "../etc/passwd"] if full() else ["../etc/passwd"])
def test_resume_path_that_is_not_a_checkpoint_is_refused(tmp_path: Path, target: str) -> None:
    if target.startswith(".."):  # climbs out of the run directory to the real /etc/passwd, from any tmp depth
        target = os.path.relpath("/etc/passwd", tmp_path)
    proc = run_cli(["+debug=tiny", f"trainer.resume={target}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "is not a valid checkpoint" in line[0] and "manifest.json" in line[0], proc.stderr
    summary.case(ROW)


@pytest.mark.parametrize("bad_name", ["../../outside", "/etc/passwd", "sub/../../x", ".."])
def test_manifest_naming_a_path_outside_the_checkpoint_is_skipped(
    tmp_path: Path, bad_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = make_state()
    ckpt = Checkpointer(str(tmp_path), keep_latest_k=3, config_hash="x")
    train_steps(state, 1)
    ckpt.save(state)
    train_steps(state, 1)
    second = Path(ckpt.save(state))
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["files"][bad_name] = {"size": 0, "checksum": "sha256:x"}
    (second / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="runner.checkpoint"):
        ref = newest_valid(LocalStorage(str(tmp_path)))
    assert ref is not None and ref.step == 1
    assert "unsafe path" in caplog.text and "step_2" in caplog.text
    summary.case(ROW)


@pytest.mark.parametrize("dtype", ["load", "system", "float32.__class__"])
def test_rank_json_cannot_name_anything_but_a_dtype(dtype: str) -> None:
    """The per-rank JSON is decoded with getattr(torch, dtype): anything that is not a dtype is refused."""
    crafted = {"__tensor__": {"dtype": dtype, "shape": [1], "b64": "AAAAAA=="}}
    with pytest.raises((ValueError, AttributeError)):
        decode(crafted)
    summary.case(ROW)


# --------------------------------------------------------------------------- secrets
def test_secrets_never_reach_logs_saved_configs_or_tensorboard(tmp_path: Path) -> None:
    env_secret, env_token, literal, nested = (f"S3CR3T{uuid.uuid4().hex}" for _ in range(4))
    args = [
        "+debug=tiny",
        "+storage.client_kwargs.api_token=${oc.env:RUNNER_TEST_TOKEN}",
        f"+storage.client_kwargs.password={literal}",
        f"+storage.client_kwargs.extra={{session_token: {nested}, region: x}}",
    ]
    proc = run_cli(args, cwd=tmp_path, env={"AWS_SECRET_ACCESS_KEY": env_secret, "RUNNER_TEST_TOKEN": env_token})
    secrets = [env_secret, env_token, literal, nested]
    written = [p for p in tmp_path.rglob("*")]
    assert any(p.parent.name == "tb" or "tfevents" in p.name for p in written), "no TensorBoard files to check"
    for path in written:
        assert not any(s in str(path) for s in secrets), f"a secret is in the path {path}"
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), f"a secret was written to {path}"
    for s in secrets:
        assert s not in proc.stdout and s not in proc.stderr
    saved = next(tmp_path.rglob(".hydra/config.yaml")).read_text()
    assert "api_token: '***'" in saved and "password: '***'" in saved, saved
    summary.case(ROW)


# --------------------------------------------------------------------------- malformed input
def test_malformed_yaml_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    extra = tmp_path / "extra" / "experiment"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text("# @package _global_\ntrainer: {max_steps: [1, 2\n")
    proc = run_cli(
        ["--config-dir", str(tmp_path / "extra"), "+debug=tiny", "+experiment=broken"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line_error(proc.stderr)
    assert "broken.yaml, line" in line and "malformed YAML" in line, line
    summary.case(ROW)


@pytest.mark.parametrize("override", ["trainer.batch_size=[1,", "trainer.=3", "=5", "trainer.batch_size='8"])
def test_malformed_override_exits_2_with_one_line(tmp_path: Path, override: str) -> None:
    proc = run_cli(["+debug=tiny", override], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "override" in one_line_error(proc.stderr)
    assert list(tmp_path.iterdir()) == []
    summary.case(ROW)


def _bomb(levels: int) -> str:
    lines = ["# @package _global_", 'l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        refs = ", ".join([f"*l{i - 1}"] * 9)
        lines.append(f"l{i}: &l{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """9 ** 12 values if expanded: without the guard this never finishes (and eats all memory)."""
    extra = tmp_path / "extra" / "experiment"
    extra.mkdir(parents=True)
    (extra / "bomb.yaml").write_text(_bomb(12))
    (extra / "anchors.yaml").write_text(
        "# @package _global_\nmodel: {width: &w 32, depth: 2}\ntrainer: {log_every: &n 2, eval_every: *n}\n"
    )
    cmd = ["--config-dir", str(tmp_path / "extra"), "+debug=tiny"]
    proc = run_cli([*cmd, "+experiment=bomb"], cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bomb.yaml" in one_line_error(proc.stderr) and "alias" in proc.stderr
    ok = run_cli(["--cfg", "job", *cmd, "+experiment=anchors"], cwd=tmp_path)  # ordinary anchors still work
    assert "eval_every: 2" in ok.stdout
    summary.case(ROW)


def test_pickle_in_tensor_data_cannot_run_code(tmp_path: Path) -> None:
    """A tensor's bytes inside a .distcp file replaced by a pickle that runs a command: DCP reads tensor data
    with ``torch.load(weights_only=True)``, so loading fails and nothing runs."""
    import io
    import pickle

    import torch

    from runner.checkpoint import errors
    from runner.checkpoint import load as loading
    from tests.helpers.state import Payload, rewrite_manifest

    state = make_state()
    train_steps(state, 1)
    folder = Path(Checkpointer(str(tmp_path), keep_latest_k=2, config_hash="x").save(state))
    marker = tmp_path / "pwned"
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    index = next(i for i in metadata.storage_data if i.fqn.startswith("model."))
    blob = io.BytesIO()
    torch.save(Payload(str(marker)), blob)
    (folder / "evil.distcp").write_bytes(blob.getvalue())
    info = metadata.storage_data[index]
    metadata.storage_data[index] = type(info)(relative_path="evil.distcp", offset=0, length=len(blob.getvalue()))
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    rewrite_manifest(str(folder))  # the attacker makes the manifest agree

    ref = newest_valid(LocalStorage(str(tmp_path)))
    assert ref is not None and ref.step == 1
    with pytest.raises(errors.UnsafeCheckpointError, match="refused by weights_only loading"):
        loading.load(ref, make_state())
    assert not marker.exists()
    summary.case(ROW)
