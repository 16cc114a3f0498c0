"""Local-disk storage: os/shutil, atomic rename, fsync where durability matters."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import IO

from runner.storage import checksum
from runner.storage.base import Entry, Progress, download_to, put_whole


def sha256_file(path: str) -> str:
    return checksum.of_file(path, "sha256")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, rename over it, fsync the folder."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


class LocalStorage:
    lists_content_keys = False

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def url(self, path: str = "") -> str:
        return os.path.join(self.root, path) if path else self.root

    def exists(self, path: str) -> bool:
        return os.path.exists(self.url(path))

    def size(self, path: str) -> int:
        return os.path.getsize(self.url(path))

    def list(self, path: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self.url(path)))
        except FileNotFoundError:
            return []

    def listing(self, path: str = "") -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for folder, _, files in os.walk(self.url(path)):
            for name in files:
                full = os.path.join(folder, name)
                out[os.path.relpath(full, self.root).replace(os.sep, "/")] = Entry(os.path.getsize(full))
        return out

    def open(self, path: str) -> IO[bytes]:
        return open(self.url(path), "rb")

    def read_bytes(self, path: str) -> bytes:
        with open(self.url(path), "rb") as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        atomic_write(self.url(path), data)

    def put(
        self, local_file: str, path: str, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> None:
        dst = self.url(path)

        def copy() -> None:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.part"
            shutil.copyfile(local_file, tmp)
            os.replace(tmp, dst)

        put_whole(copy, local_file, progress, cancel)

    def get(self, path: str, local_file: str) -> None:
        download_to(local_file, lambda tmp: shutil.copyfile(self.url(path), tmp))

    def delete(self, path: str) -> None:
        target = self.url(path)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=False)
        elif os.path.lexists(target):
            os.unlink(target)

    def checksum(self, path: str, algorithm: str = "sha256") -> str:
        return checksum.of_file(self.url(path), algorithm)

    def content_key(self, local_file: str) -> str:
        return sha256_file(local_file)
