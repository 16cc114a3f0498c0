"""The one-pass checkpoint reader: the same tensors as DCP's own reader, every byte checked, every fallback."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from runner.checkpoint import errors, manifest, resume, save, stream
from runner.checkpoint import load as loading
from runner.checkpoint.load import CorruptCheckpoint, OnePassReader, SafeLoadPlanner
from runner.storage import LocalStorage, checksum
from tests.helpers.state import make_state, tensors_of, train_steps

BIG = loading.SMALL_RECORD // 4 + 1000  # float32 elements: a record read the large-record way


@pytest.fixture(autouse=True, params=["page_cache", "direct"])
def read_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: files read through the page cache (what these small files get), and with O_DIRECT
    in 64 KiB reads (what a large checkpoint gets), so records span several read-ahead buffers."""
    if request.param == "direct":
        monkeypatch.setattr(stream, "DIRECT_MIN", 0)
        monkeypatch.setattr(stream, "CHUNK", 64 << 10)
    return str(request.param)


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(BIG, generator=g),
        "big_bf16": torch.randn(3, BIG // 3 * 2, generator=g).to(torch.bfloat16),
        "big_transposed": torch.randn(BIG // 512, 512, generator=g).t(),  # saved with its strides
        "matrix": torch.randn(7, 5, generator=g),
        "ints": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """A DCP checkpoint of ``tensors`` and its manifest's ``files`` table."""
    dcp.save(tensors, storage_writer=FileSystemWriter(str(path), thread_count=2))
    return {
        name: {"size": os.path.getsize(path / name), "checksum": checksum.of_file(str(path / name), "xxh3_128")}
        for name in os.listdir(path)
    }


def _dest(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, 7) for k, v in tensors.items()}


def _load(path: Path, files: dict[str, dict[str, Any]], dest: dict[str, torch.Tensor]) -> None:
    """dcp.load through the one-pass reader, raising the reader's own error rather than DCP's wrapper."""
    try:
        dcp.load(dest, storage_reader=OnePassReader(str(path), files), planner=SafeLoadPlanner())
    except CheckpointException as e:
        cause = next(iter(e.failures.values()))
        raise (cause[0] if isinstance(cause, tuple) else cause) from None


def _reference(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dest = _dest(tensors)
    dcp.load(dest, storage_reader=FileSystemReader(str(path)))
    return dest


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    path = tmp_path_factory.mktemp("reading") / "ckpt"
    tensors = _sample()
    return path, tensors, _save(path, tensors)


def test_loads_what_dcps_own_reader_loads(saved: tuple[Path, dict[str, torch.Tensor], dict[str, Any]]) -> None:
    path, tensors, files = saved
    dest = _dest(tensors)
    _load(path, files, dest)
    _assert_same(dest, _reference(path, tensors))
    _assert_same(dest, {k: v.contiguous() for k, v in tensors.items()})


def test_tensors_that_cannot_be_read_into_go_through_one_staging_copy(
    saved: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    # Destinations of another dtype or non-contiguous: the bytes land in a staging buffer and are copied
    # (and converted) once, as DCP's copy_ would.
    path, tensors, files = saved
    dest = _dest(tensors)
    dest["big"] = torch.zeros(BIG, dtype=torch.float64)
    dest["matrix"] = torch.zeros(5, 7).t()
    _load(path, files, dest)
    assert torch.equal(dest["big"], tensors["big"].double())
    assert not dest["matrix"].is_contiguous() and torch.equal(dest["matrix"], tensors["matrix"])


@pytest.mark.parametrize("fallback", ["no_guess", "no_descriptor", "no_fast_parse", "wrong_guess"])
def test_every_fallback_loads_the_same_tensors(
    saved: tuple[Path, dict[str, torch.Tensor], dict[str, Any]], monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    path, tensors, files = saved
    calls: list[str] = []
    generic = loading.OnePassReader._read_record_generic

    def counted_generic(self: OnePassReader, *args: Any) -> None:
        calls.append("generic")
        generic(self, *args)

    monkeypatch.setattr(loading.OnePassReader, "_read_record_generic", counted_generic)

    def broken(*args: Any) -> Any:
        raise ValueError("unexpected form")

    if fallback == "no_guess":  # records found through the zip directory (small) or read whole (large)
        monkeypatch.setattr(loading, "_guess", broken)
    elif fallback == "no_descriptor":  # every guess confirmed through the zip directory instead
        monkeypatch.setattr(loading, "_ends_at_descriptor", lambda layout, after: False)
    elif fallback == "no_fast_parse":  # DCP's way for every record: torch.load(weights_only=True)
        monkeypatch.setattr(loading, "_guess", broken)
        monkeypatch.setattr(loading, "_layout", broken)
    else:  # a guess that is off by 64 bytes: caught, and the record is read again the generic way
        guess = loading._guess
        monkeypatch.setattr(
            loading, "_guess", lambda head: loading._Layout(**{**guess(head).__dict__, "data_start": 64})
        )
        monkeypatch.setattr(loading, "_ends_at_descriptor", lambda layout, after: False)
    dest = _dest(tensors)
    _load(path, files, dest)
    _assert_same(dest, _reference(path, tensors))
    expect_generic = {"no_guess": 3, "no_descriptor": 0, "no_fast_parse": 7, "wrong_guess": 3}
    # 3 large records in the sample; DCP reads 7 of its 8 records (nothing to read for the empty tensor).
    assert len(calls) == expect_generic[fallback], calls


def _records(path: Path) -> list[Any]:
    return sorted(
        FileSystemReader(str(path)).read_metadata().storage_data.values(), key=lambda i: (i.relative_path, i.offset)
    )


@pytest.mark.parametrize("where", ["small_pickle", "small_data", "large_head", "large_data", "large_tail", "last"])
def test_a_flipped_byte_anywhere_is_reported_as_its_file_failing_its_checksum(tmp_path: Path, where: str) -> None:
    tensors = _sample()
    files = _save(tmp_path / "ckpt", tensors)
    records = _records(tmp_path / "ckpt")
    big = max(records, key=lambda r: r.length)
    small = min(records, key=lambda r: r.length)
    at = {
        "small_pickle": (small, 70),
        "small_data": (small, small.length // 2),
        "large_head": (big, 40),
        "large_data": (big, big.length // 2),
        "large_tail": (big, big.length - 30),
    }
    if where == "last":
        target = tmp_path / "ckpt" / big.relative_path
        position = target.stat().st_size - 1
    else:
        record, delta = at[where]
        target, position = tmp_path / "ckpt" / record.relative_path, record.offset + delta
    data = bytearray(target.read_bytes())
    data[position] ^= 0x20
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=rf"^{target.name} fails its checksum$"):
        _load(tmp_path / "ckpt", files, _dest(tensors))


def test_a_file_the_manifest_does_not_list_is_not_read(
    saved: tuple[Path, dict[str, torch.Tensor], dict[str, Any]],
) -> None:
    path, tensors, files = saved
    data = next(name for name in files if name.endswith(".distcp"))
    with pytest.raises(CorruptCheckpoint, match=f"{data} is read by the checkpoint but not listed"):
        _load(path, {k: v for k, v in files.items() if k != data}, _dest(tensors))


# --------------------------------------------------------------------------- resuming past a bad checkpoint
def _flip_middle_of_largest_file(folder: str) -> str:
    name = max((n for n in os.listdir(folder) if n.endswith(".distcp")), key=lambda n: os.path.getsize(f"{folder}/{n}"))
    data = bytearray(Path(folder, name).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(folder, name).write_bytes(bytes(data))
    return name


def test_a_checkpoint_that_fails_mid_load_is_skipped_and_the_state_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = make_state()
    ckpt = save.Checkpointer(str(tmp_path), keep_latest_k=5, config_hash="x")
    train_steps(state, 1)
    ckpt.save(state)
    expected = {k: v.clone() for k, v in tensors_of(state).items()}
    train_steps(state, 1)
    bad = _flip_middle_of_largest_file(ckpt.save(state))

    builds: list[int] = []

    def build() -> tuple[None, Any]:
        builds.append(1)
        return None, make_state(init_seed=1)

    plan = resume.find_resume(_trainer("auto"), str(tmp_path), _no_remote(), "run")
    with caplog.at_level(logging.WARNING, logger="runner"):
        _, loaded, ref = resume.load_newest(plan, ckpt.folder, build)
    assert ref is not None and ref.step == 1 and loaded.step == 1
    assert len(builds) == 2  # the state the bad checkpoint was half-loaded into was thrown away
    assert any("step_2" in r.getMessage() and f"{bad} fails its checksum" in r.getMessage() for r in caplog.records)
    _assert_same(tensors_of(loaded), expected)

    # With no older checkpoint left, the run starts from a freshly built state, not the half-loaded one.
    _flip_middle_of_largest_file(ckpt.folder_of(1))
    builds.clear()
    plan = resume.find_resume(_trainer("auto"), str(tmp_path), _no_remote(), "run")
    _, fresh, ref = resume.load_newest(plan, ckpt.folder, build)
    assert ref is None and fresh.step == 0 and len(builds) == 3
    _assert_same(tensors_of(fresh), tensors_of(make_state(init_seed=1)))


def test_a_named_checkpoint_that_fails_mid_load_is_an_error(tmp_path: Path) -> None:
    state = make_state()
    ckpt = save.Checkpointer(str(tmp_path), keep_latest_k=5, config_hash="x")
    train_steps(state, 1)
    folder = ckpt.save(state)
    ref = manifest.ref_at(LocalStorage(ckpt.folder), "step_1")
    name = _flip_middle_of_largest_file(folder)  # after the up-front check: found while loading
    plan = resume.ResumePlan(local=[ref], explicit=True)
    with pytest.raises(errors.CheckpointError, match=rf"trainer.resume=.*step_1 is not a valid checkpoint: {name}"):
        resume.load_newest(plan, ckpt.folder, lambda: (None, make_state()))


def _trainer(choice: str) -> Any:
    from runner.config import TrainerConfig

    return TrainerConfig(resume=choice)


def _no_remote() -> Any:
    from runner.storage import StorageSettings

    return StorageSettings()
