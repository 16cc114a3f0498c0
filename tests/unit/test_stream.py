"""The read-ahead stream under the checkpoint reader: every byte once, in order, hashed; O_DIRECT where the
file system allows it; errors raised on the caller's thread; no thread left behind."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from runner.checkpoint import stream
from runner.storage import checksum

ALGORITHM = checksum.MANIFEST_ALGORITHM


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "CHUNK", 16 << 10)  # files of a few hundred KiB span many buffers


def _file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "data"
    path.write_bytes(data)
    return path, data


def _open(path: Path, size: int, direct: bool) -> tuple[int, stream.InOrder]:
    fd = os.open(path, os.O_RDONLY)
    return fd, stream.InOrder(fd, str(path), size, ALGORITHM, stream.Ring(), direct=direct)


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ckpt-read-ahead"]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [0, 1, 4095, 16 << 10, (16 << 10) * 5 + 123, 300_001])
def test_every_byte_in_order_and_the_files_checksum(tmp_path: Path, size: int, direct: bool) -> None:
    path, data = _file(tmp_path, size)
    fd, s = _open(path, size, direct)
    with s:
        head = s.peek(0, min(size, 10)) if size else b""
        first = bytes(s.read(size // 3))
        s.skip_to(size // 2)
        rest = bytearray(size - size // 2)
        s.read_into(memoryview(rest))
        assert s.pos == size
        assert s.checksum == checksum.of_file(str(path), ALGORITHM)
    os.close(fd)
    assert head == data[:10] and first == data[: size // 3] and bytes(rest) == data[size // 2 :]
    assert not _readers()


def test_o_direct_is_used_for_large_files_and_refusals_fall_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = _file(tmp_path, 200_000)
    flags: list[int] = []
    real_open, real_preadv = os.open, os.preadv
    refused: list[int] = []

    def recording_open(p: str, f: int, *a: int) -> int:
        flags.append(f)
        return real_open(p, f, *a)

    def refusing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & stream._O_DIRECT and not refused:
            refused.append(fd)  # the first O_DIRECT read is refused, as some file systems do
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(stream.os, "open", recording_open)
    monkeypatch.setattr(stream.os, "preadv", refusing_preadv)
    fd, s = _open(path, len(data), direct=True)
    with s:
        got = bytes(s.read(len(data)))
        assert s.checksum == checksum.of_bytes(data, ALGORITHM)
    os.close(fd)
    assert got == data
    assert refused, "the first O_DIRECT read was not attempted"
    assert any(f & stream._O_DIRECT for f in flags) and any(not f & stream._O_DIRECT for f in flags[1:])


def test_a_file_shorter_than_expected_says_where_it_ends(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 50_000)
    fd, s = _open(path, 60_000, direct=False)
    with s, pytest.raises(EOFError, match="50000"):
        s.skip_to(60_000)
    os.close(fd)
    assert not _readers()


def test_a_read_error_on_the_thread_is_raised_to_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _file(tmp_path, 100_000)
    real_preadv = os.preadv

    def failing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset >= 40_000:
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(stream.os, "preadv", failing_preadv)
    fd, s = _open(path, 100_000, direct=False)
    with s, pytest.raises(OSError, match="Input/output error"):
        s.skip_to(100_000)
    os.close(fd)
    assert not _readers()


def test_closing_mid_file_stops_the_thread(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 400_000)
    fd, s = _open(path, len(data), direct=False)
    with s:
        assert bytes(s.read(1000)) == data[:1000]
    os.close(fd)
    assert not _readers()


@pytest.mark.timeout(30)
def test_after_the_thread_failed_every_later_read_raises_again_instead_of_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _file(tmp_path, 10_000)

    def refusing_open(p: str, f: int, *a: int) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", p)

    fd = os.open(path, os.O_RDONLY)
    monkeypatch.setattr(stream.os, "open", refusing_open)
    with stream.InOrder(fd, str(path), 10_000, ALGORITHM, stream.Ring()) as s:
        for _ in range(2):  # the reader hashes the rest of a file after a failed record: it must not hang
            with pytest.raises(PermissionError):
                s.skip_to(10_000)
    os.close(fd)
    assert not _readers()
