"""Remote storage over any fsspec URL (s3fs first); the backend is imported at the point of use."""

from __future__ import annotations

from typing import IO, Any

from runner.storage import checksum
from runner.storage.base import StorageError
from runner.storage.local import CHUNK


class FsspecStorage:
    def __init__(
        self,
        root: str,
        endpoint_url: str = "",
        region: str = "",
        client_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import fsspec

        self.root = root.rstrip("/")
        options: dict[str, Any] = {}
        if root.startswith("s3://"):
            ck: dict[str, Any] = dict(client_kwargs or {})
            if endpoint_url:
                ck["endpoint_url"] = endpoint_url
            if region:
                ck["region_name"] = region
            # NOTE: credentials come from the environment / AWS credential chain only, never from config.
            options = {"client_kwargs": ck, "use_listings_cache": False}
        try:
            self.fs, self._path = fsspec.core.url_to_fs(self.root, **options)
        except ImportError as e:
            raise StorageError(f"no filesystem for {self.root!r}: {e}") from e
        self._path = self._path.rstrip("/")

    def _p(self, path: str) -> str:
        return f"{self._path}/{path}".rstrip("/") if path else self._path

    def url(self, path: str = "") -> str:
        return f"{self.root}/{path}" if path else self.root

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self._p(path)))

    def list(self, path: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._p(path), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def walk(self, path: str = "") -> dict[str, int]:
        try:
            found = self.fs.find(self._p(path), detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        prefix = f"{self._path}/"
        return {
            str(name)[len(prefix) :]: int(info.get("size") or 0)
            for name, info in found.items()
            if info.get("type", "file") == "file"
        }

    def open(self, path: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self._p(path), mode)

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(self._p(path)))

    def write_bytes(self, path: str, data: bytes) -> None:
        # One PUT: an object store shows the old object or the new one, never a part.
        self.fs.pipe_file(self._p(path), data)

    def put(self, local_file: str, path: str) -> None:
        self.fs.put_file(local_file, self._p(path))

    def get(self, path: str, local_file: str) -> None:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(local_file)), exist_ok=True)
        tmp = f"{local_file}.part"
        self.fs.get_file(self._p(path), tmp)
        os.replace(tmp, local_file)

    def delete(self, path: str) -> None:
        target = self._p(path)
        try:
            if self.fs.isdir(target):
                self.fs.rm(target, recursive=True)
            else:
                self.fs.rm_file(target)
        except FileNotFoundError:
            pass

    def size(self, path: str) -> int:
        return int(self.fs.size(self._p(path)))

    def checksum(self, path: str, algorithm: str = "sha256") -> str:
        with self.fs.open(self._p(path), "rb", block_size=CHUNK) as f:
            return checksum.of_stream(f, algorithm)
