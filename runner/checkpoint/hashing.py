"""Checksums of checkpoint files computed while DCP writes them, instead of re-reading them afterwards.

A manifest needs the checksum of every file. Hashing after the write reads every byte back (1 GB for a
ViT-B/16 + AdamW state: about a second on these cores, as long as the write itself). Here the digest is
updated from the very buffers DCP hands to ``write``, inside DCP's writer threads, so the hashing of two
files overlaps and no byte is read twice. The manifest format is unchanged (``<algorithm>:<hex>``), so
verification and the syncer read it as before. The algorithm is the manifests' (xxh3_128, see
:mod:`runner.storage.checksum`).

Because every byte is hashed, ``torch.save``'s own CRC32 of each zip record (inside DCP) is redundant: it
is switched off while a file is written (:func:`without_zip_crc32`).

NOTE: this relies on DCP (and ``torch.save`` inside it) writing each file strictly sequentially; torch's
zip writer refuses anything else (``unexpected pos``), and a write at an unexpected position here raises.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from runner.storage import checksum


class _HashingStream(io.RawIOBase):
    """A write-only file that feeds every byte it writes to a hash."""

    def __init__(self, raw: Any, algorithm: str) -> None:
        self.raw = raw
        self.digest = checksum.hasher(algorithm)
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = self.raw.write(view)
        if n is None or n != len(view):
            # NOTE: a short write would leave the digest ahead of the file; buffered files never do this.
            raise OSError(f"short write to {getattr(self.raw, 'name', '?')}: {n} of {len(view)} bytes")
        self.digest.update(view)
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset, io.SEEK_END: self.pos + offset}[whence]
        if target != self.pos:
            raise OSError("checkpoint files are hashed while written: only sequential writes are supported")
        return self.pos

    def fileno(self) -> int:
        return int(self.raw.fileno())

    def flush(self) -> None:
        self.raw.flush()


@contextmanager
def without_zip_crc32() -> Iterator[None]:
    """Skip the CRC32 ``torch.save`` computes for every zip record, in this thread (torch's serialization
    config is a context variable, so DCP's writer threads each need their own switch). torch < 2.6 has none."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    has_switch = getattr(getattr(config, "save", None), "compute_crc32", None) is not None
    with config.patch({"save.compute_crc32": False}) if has_switch else nullcontext():  # type: ignore[attr-defined]
        yield


class _HashingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, str] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        # NOTE: DCP runs this block in the thread that writes the file, around all of its torch.save calls.
        with open(path, mode) as raw, without_zip_crc32():
            stream = _HashingStream(raw, checksum.MANIFEST_ALGORITHM)
            yield stream
            raw.flush()
        with self._lock:
            self.digests[os.path.abspath(path)] = f"{checksum.MANIFEST_ALGORITHM}:{stream.digest.hexdigest()}"

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            digest = self.digests.pop(os.path.abspath(path), None)
            if digest is not None:
                self.digests[os.path.abspath(new_path)] = digest


class HashingWriter(FileSystemWriter):
    """``FileSystemWriter`` that knows the checksum of every file it wrote (:meth:`checksum`)."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fs: _HashingFileSystem = _HashingFileSystem()

    def checksum(self, path: str) -> str | None:
        """``<algorithm>:<hex>`` of ``path`` if this writer wrote it, else None (hash it by reading it)."""
        return self.fs.digests.get(os.path.abspath(path))

    def checksums(self) -> dict[str, str]:
        """``{absolute path: <algorithm>:<hex>}`` of every file this writer wrote."""
        with self.fs._lock:
            return dict(self.fs.digests)
