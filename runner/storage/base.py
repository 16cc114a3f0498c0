"""Where bytes go: one protocol over run-relative ``str`` paths, for resume, history and the syncer alike.

``str``, not ``Path``: ``Path`` collapses ``s3://``. Implementations: :mod:`.local` (os/shutil),
:mod:`.fsspec` (any fsspec URL but S3: ``memory://``, ``gs://``, ...) and :mod:`.s3` (boto3; the only
module that knows S3). :class:`runner.storage.StorageSettings` picks one by URL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import IO, NamedTuple, Protocol

#: Called with the number of bytes sent since the last call.
Progress = Callable[[int], None]


class StorageError(RuntimeError):
    """A storage operation failed; the message names the cause (credentials never appear in it)."""


class RemoteUnreachable(StorageError):
    """The remote did not answer (connection refused, dropped or timed out): the whole remote is down, as
    opposed to a problem with one file, so the syncer stops its pass instead of retrying every file."""


class UploadCancelled(Exception):
    """The upload was stopped through its ``cancel`` event; nothing of it is visible on the remote."""


class Entry(NamedTuple):
    """One file of a :meth:`Storage.listing`."""

    size: int
    #: Content key as the listing reports it (the S3 ETag), comparable with :meth:`Storage.content_key` of a
    #: local file; None where the listing has none (local disk, fsspec).
    key: str | None = None


class Storage(Protocol):
    #: Absolute path or URL of the root; every ``path`` argument is relative to it.
    root: str
    #: True if :meth:`listing` reports content keys (S3 ETags). Elsewhere the syncer records the
    #: :meth:`content_key` of what it uploads, and a file it did not upload is uploaded again rather than
    #: trusted by its size.
    lists_content_keys: bool

    def url(self, path: str = "") -> str: ...

    def exists(self, path: str) -> bool:
        """True for a file, or a folder with something in it."""
        ...

    def size(self, path: str) -> int: ...

    def list(self, path: str = "") -> list[str]:
        """Names directly under ``path`` (files and folders), sorted; [] if it does not exist."""
        ...

    def listing(self, path: str = "") -> dict[str, Entry]:
        """Every file under ``path`` by run-relative path, with its size and listed key: one paged listing."""
        ...

    def open(self, path: str) -> IO[bytes]:
        """``path`` as a stream, for reading."""
        ...

    def read_bytes(self, path: str) -> bytes: ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole object; readers see the old content or the new, never a part."""
        ...

    def put(
        self, local_file: str, path: str, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> None:
        """Upload one local file to ``path``. Setting ``cancel`` may stop it early (raising
        :class:`UploadCancelled`, with the remote left as it was); a backend that cannot stop an upload midway
        honours it only before it starts."""
        ...

    def get(self, path: str, local_file: str) -> None:
        """Download ``path`` to a local file (written to a temporary name, then renamed)."""
        ...

    def delete(self, path: str) -> None:
        """Delete a file or a whole folder; a missing path is not an error."""
        ...

    def checksum(self, path: str, algorithm: str = "sha256") -> str:
        """``<algorithm>:<hex>`` of the content (see :mod:`runner.storage.checksum`)."""
        ...

    def content_key(self, local_file: str) -> str:
        """The content key this storage would give ``local_file`` once uploaded (see :attr:`lists_content_keys`)."""
        ...


def download_to(local_file: str, fetch: Callable[[str], object]) -> None:
    """``fetch(tmp)`` into a temporary name beside ``local_file``, then rename: a reader never sees a part."""
    os.makedirs(os.path.dirname(os.path.abspath(local_file)), exist_ok=True)
    tmp = f"{local_file}.part"
    fetch(tmp)
    os.replace(tmp, local_file)


def put_whole(
    copy: Callable[[], None], local_file: str, progress: Progress | None, cancel: threading.Event | None
) -> None:
    """An upload that cannot be stopped midway: ``cancel`` counts before it starts, progress is told at the end."""
    if cancel is not None and cancel.is_set():
        raise UploadCancelled(local_file)
    copy()
    if progress is not None:
        progress(os.path.getsize(local_file))
