"""Where bytes go: one small protocol over run-relative ``str`` paths.

``str``, not ``Path``: ``Path`` collapses ``s3://``. Implementations: :mod:`.local` (os/shutil) and
:mod:`.remote` (any fsspec URL, s3fs first).
"""

from __future__ import annotations

from typing import IO, Protocol


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and the operation."""


class Storage(Protocol):
    #: Absolute path or URL of the root; every ``path`` argument is relative to it.
    root: str

    def url(self, path: str = "") -> str: ...

    def exists(self, path: str) -> bool: ...

    def list(self, path: str = "") -> list[str]:
        """Names directly under ``path`` (files and folders), sorted; [] if it does not exist."""
        ...

    def walk(self, path: str = "") -> dict[str, int]:
        """Every file under ``path``: run-relative path -> size in bytes."""
        ...

    def open(self, path: str, mode: str = "rb") -> IO[bytes]: ...

    def read_bytes(self, path: str) -> bytes: ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole object; readers see the old content or the new, never a part."""
        ...

    def put(self, local_file: str, path: str) -> None:
        """Upload one local file to ``path``."""
        ...

    def get(self, path: str, local_file: str) -> None:
        """Download ``path`` to a local file (written to a temporary name, then renamed)."""
        ...

    def delete(self, path: str) -> None:
        """Delete a file or a whole folder; a missing path is not an error."""
        ...

    def size(self, path: str) -> int: ...

    def checksum(self, path: str, algorithm: str = "sha256") -> str:
        """``<algorithm>:<hex>`` of the content (see :mod:`runner.storage.checksum`)."""
        ...
