"""Checkpoints: exact round trip, verification, retention, and refusal of pickled payloads."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from runner.checkpoint import errors, manifest, resume
from runner.checkpoint import load as loading
from runner.checkpoint.errors import UnsafeCheckpointError
from runner.checkpoint.layout import MANIFEST
from runner.checkpoint.load import read_tensors
from runner.checkpoint.manifest import newest_valid
from runner.checkpoint.save import Checkpointer
from runner.storage import LocalStorage, checksum
from tests.conftest import unavailable
from tests.helpers.state import Payload, make_state, rewrite_manifest, tensors_of, train_steps


def test_round_trip_continues_bitwise(tmp_path: Path) -> None:
    reference = make_state()
    train_steps(reference, 5)
    ckpt = Checkpointer(str(tmp_path), keep_latest_k=2, config_hash="x")
    ckpt.save(reference)
    train_steps(reference, 9)  # crosses an epoch boundary (8 batches per epoch)

    resumed = make_state(init_seed=1)  # different init: everything must come from the checkpoint
    ref = newest_valid(LocalStorage(str(tmp_path)))
    assert ref is not None and ref.step == 5
    loading.load(ref, resumed)
    assert resumed.step == 5
    train_steps(resumed, 9)
    a, b = tensors_of(reference), tensors_of(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_manifest_lists_sizes_and_checksums(tmp_path: Path) -> None:
    state = make_state()
    train_steps(state, 1)
    path = Checkpointer(str(tmp_path), 2, "cfg").save(state)
    manifest = json.loads(Path(path, MANIFEST).read_text())
    assert manifest["step"] == 1 and manifest["world_size"] == 1 and manifest["config_hash"] == "cfg"
    for name, info in manifest["files"].items():
        assert os.path.getsize(os.path.join(path, name)) == info["size"]
        assert info["checksum"].startswith(checksum.MANIFEST_ALGORITHM + ":")
        assert checksum.of_file(os.path.join(path, name), checksum.MANIFEST_ALGORITHM) == info["checksum"]
    assert set(read_tensors(path)) >= {"model.head.weight", "optim.state.head.weight.exp_avg"}


def test_save_skips_zip_crc32_only_inside_the_save(tmp_path: Path) -> None:
    # The manifest's checksum covers every byte, so the save switches off torch.save's per-record CRC32,
    # and must switch it back on for everyone else.
    try:
        from torch.utils.serialization import config
    except ImportError:
        config = None
    if config is None or getattr(config.save, "compute_crc32", None) is None:
        # CI pins a torch that has it: this test must run there, never skip
        unavailable(f"torch {torch.__version__} has no switch for the zip CRC32 (torch.utils.serialization.config)")
    seen: list[bool] = []
    real_save = torch.save

    def spying_save(*args: object, **kwargs: object) -> None:
        seen.append(config.save.compute_crc32)
        real_save(*args, **kwargs)  # type: ignore[arg-type]

    state = make_state()
    train_steps(state, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", spying_save)
        path = Checkpointer(str(tmp_path), 2, "cfg").save(state)
    assert seen and not any(seen), "DCP's torch.save ran with the CRC32 on"
    assert config.save.compute_crc32 is True
    assert manifest.verify(LocalStorage(str(tmp_path)), "checkpoints/step_1")[0] is not None
    assert set(read_tensors(path)) >= {"model.head.weight"}


def test_manifest_checksum_algorithms_old_and_unknown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Manifests written with sha256 (earlier versions) still verify; an algorithm this version does not
    # know makes the checkpoint unverifiable: skipped with a warning naming it, the previous one is used.
    _, _, second = _two_checkpoints(tmp_path)
    rewrite_manifest(second)  # sha256 checksums
    storage = LocalStorage(str(tmp_path))
    assert manifest.verify(storage, "checkpoints/step_2")[0] is not None
    written = json.loads(Path(second, MANIFEST).read_text())
    for info in written["files"].values():
        info["checksum"] = "blake9:" + info["checksum"].partition(":")[2]
    Path(second, MANIFEST).write_text(json.dumps(written))
    with caplog.at_level(logging.WARNING):
        ref = newest_valid(storage)
    assert ref is not None and ref.step == 1
    assert "blake9" in caplog.text and "step_2" in caplog.text


def _two_checkpoints(tmp_path: Path) -> tuple[Checkpointer, str, str]:
    state = make_state()
    ckpt = Checkpointer(str(tmp_path), keep_latest_k=5, config_hash="x")
    train_steps(state, 1)
    first = ckpt.save(state)
    train_steps(state, 1)
    second = ckpt.save(state)
    return ckpt, first, second


def _distcp(path: str) -> str:
    return next(os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".distcp"))


@pytest.mark.parametrize(
    "damage",
    ["no_manifest", "flipped_byte", "truncated", "malformed_manifest", "missing_file", "empty_dir"],
)
def test_damaged_newest_is_skipped_with_a_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, first, second = _two_checkpoints(tmp_path)
    if damage == "no_manifest":
        os.remove(os.path.join(second, MANIFEST))
    elif damage == "flipped_byte":
        target = _distcp(second)
        data = bytearray(Path(target).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(target).write_bytes(bytes(data))
    elif damage == "truncated":
        target = _distcp(second)
        os.truncate(target, os.path.getsize(target) // 2)
    elif damage == "malformed_manifest":
        Path(second, MANIFEST).write_text("{not json")
    elif damage == "missing_file":
        os.remove(_distcp(second))
    elif damage == "empty_dir":
        shutil.rmtree(second)
        os.makedirs(second)
    with caplog.at_level(logging.WARNING, logger="runner.checkpoint"):
        ref = newest_valid(LocalStorage(str(tmp_path)))
    assert ref is not None and ref.step == 1 and ref.url == first
    assert any("step_2" in r.getMessage() for r in caplog.records), caplog.text


def test_explicit_resume_of_a_damaged_checkpoint_is_an_error(tmp_path: Path) -> None:
    _, _, second = _two_checkpoints(tmp_path)
    os.remove(os.path.join(second, MANIFEST))
    with pytest.raises(errors.CheckpointError, match="not a valid checkpoint"):
        manifest.ref_at(LocalStorage(str(tmp_path / "checkpoints")), "step_2")


def test_pickled_metadata_cannot_run_code(tmp_path: Path) -> None:
    _, _, second = _two_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    Path(second, ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    rewrite_manifest(second)
    ref = newest_valid(LocalStorage(str(tmp_path)))
    assert ref is not None and ref.step == 2  # integrity checks pass: the attacker fixed the manifest
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        loading.load(ref, make_state())
    assert not marker.exists()


def test_pickled_tensor_entry_cannot_run_code(tmp_path: Path) -> None:
    _, _, second = _two_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    tensors = read_tensors(second)
    nested: dict = {"model": {}, "optim": {}}
    for key, value in tensors.items():
        top, rest = key.split(".", 1)
        nested[top][rest] = value
    nested["model"]["head.bias"] = Payload(str(marker))  # a pickled object where a tensor belongs
    for name in os.listdir(second):
        if name.endswith(".distcp") or name == ".metadata":
            os.remove(os.path.join(second, name))
    dcp.save(nested, storage_writer=FileSystemWriter(second))
    rewrite_manifest(second)
    ref = newest_valid(LocalStorage(str(tmp_path)))
    assert ref is not None and ref.step == 2
    with pytest.raises(UnsafeCheckpointError, match=r"model\.head\.bias"):
        loading.load(ref, make_state())
    assert not marker.exists()


def test_retention_keeps_the_newest_k(tmp_path: Path) -> None:
    state = make_state()
    ckpt = Checkpointer(str(tmp_path), keep_latest_k=2, config_hash="x")
    for _ in range(4):
        train_steps(state, 1)
        ckpt.save(state)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_3", "step_4"]


def test_partial_saves_are_cleaned_and_never_loaded(tmp_path: Path) -> None:
    _, _, second = _two_checkpoints(tmp_path)
    partial = tmp_path / "checkpoints" / "step_9.tmp"
    shutil.copytree(second, partial)
    ref = newest_valid(LocalStorage(str(tmp_path)))
    assert ref is not None and ref.step == 2
    Checkpointer(str(tmp_path), 2, "x").clean_partial()
    assert not partial.exists()


def test_a_remote_checkpoint_is_verified_once_in_its_downloaded_copy(tmp_path: Path) -> None:
    # Resuming from the remote reads each byte once: the candidate is checked by structure (manifest, names,
    # sizes), downloaded, and its checksums are verified in the local copy, not streamed twice.
    import uuid

    from runner.storage import StorageSettings

    state = make_state()
    train_steps(state, 2)
    ckpt = Checkpointer(str(tmp_path / "src"), keep_latest_k=3, config_hash="x")
    for _ in range(2):
        ckpt.save(state)
        train_steps(state, 2)
    remote = StorageSettings().open_url(f"memory://ckpt-{uuid.uuid4().hex[:8]}/run")
    for folder in ("step_2", "step_4"):
        for name in os.listdir(tmp_path / "src" / "checkpoints" / folder):
            remote.put(str(tmp_path / "src" / "checkpoints" / folder / name), f"checkpoints/{folder}/{name}")
    hashed: list[str] = []
    remote_checksum = remote.checksum
    remote.checksum = lambda path, algorithm="sha256": hashed.append(path) or remote_checksum(path, algorithm)  # type: ignore[method-assign]

    refs = list(manifest.valid_refs(remote, checksums=False))
    assert [r.step for r in refs] == [4, 2] and hashed == []
    local = resume.fetch(refs[0], str(tmp_path / "run" / "checkpoints"))
    assert hashed == []
    assert isinstance(local.storage, LocalStorage) and local.source == refs[0].url and local.step == 4
    assert manifest.verify(LocalStorage(str(tmp_path / "run" / "checkpoints")), "step_4")[0] is not None

    # A flipped byte on the remote passes the structure check and is caught in the copy, naming the file;
    # the copy is not left behind.
    data = next(n for n in refs[1].manifest["files"] if n.endswith(".distcp"))
    body = bytearray(remote.read_bytes(f"checkpoints/step_2/{data}"))
    body[len(body) // 2] ^= 1
    remote.write_bytes(f"checkpoints/step_2/{data}", bytes(body))
    assert manifest.verify(remote, "checkpoints/step_2", checksums=False)[0] is not None
    with pytest.raises(errors.CorruptCheckpoint, match=data):
        resume.fetch(refs[1], str(tmp_path / "run" / "checkpoints"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_4"]


@pytest.mark.parametrize(("saved", "now"), [(1, 2), (2, 1)])
def test_loading_at_another_world_size_warns_once_about_the_data_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, saved: int, now: int
) -> None:
    state = make_state()
    train_steps(state, 2)
    folder = Checkpointer(str(tmp_path), keep_latest_k=2, config_hash="x").save(state)
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    manifest["world_size"] = saved  # as if written by `saved` ranks (rank 0's files are what load reads)
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(loading.distributed, "world_size", lambda: now)
    ref = newest_valid(LocalStorage(str(tmp_path)))
    assert ref is not None
    with caplog.at_level(logging.WARNING):
        loading.load(ref, make_state())
    said = [r.getMessage() for r in caplog.records if "data position" in r.getMessage()]
    assert len(said) == 1 and f"saved by {saved} ranks and loads into {now}" in said[0], said
