"""Storage over any fsspec URL but S3 (``memory://``, ``gs://``, ...); the backend is imported at the point of use.

S3 goes through :mod:`.s3` (boto3) instead: its listing gives the ETags the syncer compares content by, and its
transfer manager uploads more than twice as fast as s3fs on a local server (shared/notes/bench.md).
"""

from __future__ import annotations

import threading
from typing import IO

from runner.storage import checksum
from runner.storage.base import Entry, Progress, StorageError, download_to, put_whole
from runner.storage.local import sha256_file


class FsspecStorage:
    lists_content_keys = False

    def __init__(self, root: str) -> None:
        import fsspec

        self.root = root.rstrip("/")
        try:
            self.fs, self._path = fsspec.core.url_to_fs(self.root)
        except ImportError as e:
            raise StorageError(f"no filesystem for {self.root!r}: {e}") from e
        self._path = self._path.rstrip("/")

    def _p(self, path: str) -> str:
        return f"{self._path}/{path}".rstrip("/") if path else self._path

    def url(self, path: str = "") -> str:
        return f"{self.root}/{path}" if path else self.root

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self._p(path)))

    def size(self, path: str) -> int:
        return int(self.fs.size(self._p(path)))

    def list(self, path: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._p(path), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def listing(self, path: str = "") -> dict[str, Entry]:
        try:
            found = self.fs.find(self._p(path), detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        prefix = f"{self._path}/"
        return {
            str(name)[len(prefix) :]: Entry(int(info.get("size") or 0))
            for name, info in found.items()
            if info.get("type", "file") == "file"
        }

    def open(self, path: str) -> IO[bytes]:
        return self.fs.open(self._p(path), "rb")

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(self._p(path)))

    def write_bytes(self, path: str, data: bytes) -> None:
        # One PUT: an object store shows the old object or the new one, never a part.
        self.fs.pipe_file(self._p(path), data)

    def put(
        self, local_file: str, path: str, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> None:
        put_whole(lambda: self.fs.put_file(local_file, self._p(path)), local_file, progress, cancel)

    def get(self, path: str, local_file: str) -> None:
        download_to(local_file, lambda tmp: self.fs.get_file(self._p(path), tmp))

    def delete(self, path: str) -> None:
        target = self._p(path)
        try:
            if self.fs.isdir(target):
                self.fs.rm(target, recursive=True)
            else:
                self.fs.rm_file(target)
        except FileNotFoundError:
            pass

    def checksum(self, path: str, algorithm: str = "sha256") -> str:
        with self.fs.open(self._p(path), "rb", block_size=checksum.CHUNK) as f:
            return checksum.of_stream(f, algorithm)

    def content_key(self, local_file: str) -> str:
        return sha256_file(local_file)
