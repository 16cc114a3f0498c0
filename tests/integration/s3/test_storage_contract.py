"""The storage contract, asserted identically against local disk, fsspec ``memory://`` and S3 (moto)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from runner.storage import Storage, StorageSettings
from runner.storage.local import LocalStorage
from runner.storage.s3 import S3Connection
from tests.s3_server import S3Server


def _local(tmp_path: Path, request: pytest.FixtureRequest) -> Storage:
    return LocalStorage(str(tmp_path / "root"))


def _memory(tmp_path: Path, request: pytest.FixtureRequest) -> Storage:
    return StorageSettings().open_url(f"memory://contract-{uuid.uuid4().hex[:8]}/run")


def _s3(tmp_path: Path, request: pytest.FixtureRequest) -> Storage:
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket("contract")
    return StorageSettings(s3=S3Connection(endpoint_url=server.endpoint)).open_url(f"s3://{bucket}/prefix/run")


BACKENDS: list[object] = [
    pytest.param(_local, id="local"),
    pytest.param(_memory, id="memory"),
    pytest.param(_s3, id="s3", marks=pytest.mark.s3),
]


def sizes(storage: Storage, path: str = "") -> dict[str, int]:
    """Every file under ``path`` with its size, from the storage's listing."""
    return {rel: entry.size for rel, entry in storage.listing(path).items()}


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    make: Callable[[Path, pytest.FixtureRequest], Storage] = request.param
    return make(tmp_path, request)


def test_write_read_exists_size_checksum(storage: Storage) -> None:
    data = b"hello checkpoint" * 1000
    assert not storage.exists("a/b.bin")
    storage.write_bytes("a/b.bin", data)
    assert storage.exists("a/b.bin")
    assert storage.read_bytes("a/b.bin") == data
    assert storage.size("a/b.bin") == len(data)
    assert storage.checksum("a/b.bin") == "sha256:" + hashlib.sha256(data).hexdigest()
    assert storage.checksum("a/b.bin", "xxh3_128") == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    storage.write_bytes("a/b.bin", b"x" * len(data))  # Same size, new content.
    assert storage.read_bytes("a/b.bin") == b"x" * len(data)
    assert storage.checksum("a/b.bin") != "sha256:" + hashlib.sha256(data).hexdigest()
    assert storage.checksum("a/b.bin", "xxh3_128") != "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def test_list_and_walk(storage: Storage) -> None:
    assert storage.list("nothing") == []
    assert sizes(storage, "nothing") == {}
    storage.write_bytes("checkpoints/step_1/manifest.json", b"{}")
    storage.write_bytes("checkpoints/step_2/x", b"12345")
    storage.write_bytes("top.txt", b"1")
    assert storage.list("checkpoints") == ["step_1", "step_2"]
    assert storage.list("") == ["checkpoints", "top.txt"]
    assert sizes(storage) == {"checkpoints/step_1/manifest.json": 2, "checkpoints/step_2/x": 5, "top.txt": 1}


def test_put_get_open(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 100)
    storage.put(str(src), "d/file.bin")
    out = tmp_path / "out" / "file.bin"
    storage.get("d/file.bin", str(out))
    assert out.read_bytes() == src.read_bytes()
    assert not (tmp_path / "out" / "file.bin.part").exists()
    with storage.open("d/file.bin") as f:
        assert f.read(3) == bytes([0, 1, 2])


def test_delete_file_folder_and_missing(storage: Storage) -> None:
    storage.write_bytes("f/1", b"1")
    storage.write_bytes("f/2", b"2")
    storage.write_bytes("g", b"3")
    storage.delete("g")
    assert not storage.exists("g")
    storage.delete("f")
    assert sizes(storage) == {}
    storage.delete("does/not/exist")  # Not an error.


def test_url_names_the_root(storage: Storage) -> None:
    assert storage.url("x/y").endswith("/x/y")
    assert storage.url() == storage.root
