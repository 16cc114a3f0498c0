"""Where the syncer's bytes go: one listing, upload, delete, and the content key of a local file.

S3 goes through boto3's transfer manager: on a local S3 server it moved a 1 GiB object at 139 MB/s where
``s3fs.put_file`` managed 59-85 MB/s (shared/notes/bench.md), and its listing returns ETags, which let
the syncer compare content without downloading anything. Any other fsspec URL (or a local folder) goes
through :class:`~runner.storage.base.Storage`, with sizes from one ``walk`` and sha256 as content key.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from runner.storage.base import Storage

#: Multipart part size and parallel parts per file: on moto, 8 MiB x 16 moved a 100 MB file in ~1.0 s where
#: 16 MiB x 4 took 1.6-2.0 s (bench/sync.py measures the end result against awscli).
PART_BYTES = 8 << 20
PART_CONCURRENCY = 16


@dataclass(frozen=True)
class RemoteObject:
    size: int
    #: Content key as the remote reports it (S3 ETag), or None when the listing has none.
    etag: str | None = None


class Remote(Protocol):
    """What the syncer needs from a remote: one listing, upload, delete, and a local content key."""

    url: str
    #: True if ``listing`` returns content keys comparable with ``content_key`` (S3 ETags).
    lists_content_keys: bool

    def listing(self) -> dict[str, RemoteObject]: ...

    def upload(
        self,
        local_file: str,
        rel: str,
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Upload ``local_file`` as ``rel``. Setting ``cancel`` may stop it early (raising
        :class:`UploadCancelled`, with the remote left as it was); a remote that cannot stop one may finish."""
        ...

    def delete(self, rel: str) -> None: ...

    def read(self, rel: str) -> bytes:
        """The whole object ``rel`` (small files only: retention reads checkpoint manifests)."""
        ...

    def content_key(self, local_file: str) -> str: ...


class UploadCancelled(Exception):
    """The upload was stopped through its ``cancel`` event; nothing of it is visible on the remote."""


def s3_etag(path: str, part_bytes: int = PART_BYTES, threads: int = 4) -> str:
    """The ETag S3 gives ``path`` uploaded with ``part_bytes`` parts (md5, or md5 of part md5s + ``-N``).

    Parts are hashed in parallel (hashlib releases the GIL): this hash sits on the critical path of an
    incremental sync whenever a big file's mtime changed.
    """
    size = os.path.getsize(path)
    if size < part_bytes:
        with open(path, "rb") as f:
            return hashlib.md5(f.read(), usedforsecurity=False).hexdigest()
    fd = os.open(path, os.O_RDONLY)
    try:

        def part(offset: int) -> bytes:
            return hashlib.md5(os.pread(fd, part_bytes, offset), usedforsecurity=False).digest()

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="etag") as pool:
            digests = list(pool.map(part, range(0, size, part_bytes)))
    finally:
        os.close(fd)
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


class S3Remote:
    """``s3://bucket/prefix`` through boto3 (transfer manager: parallel multipart parts, pooled clients)."""

    lists_content_keys = True

    def __init__(
        self,
        url: str,
        endpoint_url: str = "",
        region: str = "",
        client_kwargs: dict[str, Any] | None = None,
        part_bytes: int = PART_BYTES,
        part_concurrency: int = PART_CONCURRENCY,
        max_connections: int = 64,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.url = url.rstrip("/")
        self.bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        kwargs: dict[str, Any] = dict(client_kwargs or {})
        if endpoint_url:
            kwargs["endpoint_url"] = endpoint_url
        if region:
            kwargs["region_name"] = region
        # NOTE: few, quick retries: the syncer has its own backoff and must notice an outage promptly.
        kwargs.setdefault(
            "config",
            Config(
                max_pool_connections=max_connections,
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        # Credentials: environment / AWS credential chain only.
        self.client = boto3.session.Session().client("s3", **kwargs)
        self.part_bytes = part_bytes
        self.transfer = TransferConfig(
            multipart_threshold=part_bytes,
            multipart_chunksize=part_bytes,
            max_concurrency=part_concurrency,
            use_threads=True,
        )

    def listing(self) -> dict[str, RemoteObject]:
        out: dict[str, RemoteObject] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(self.prefix) :]] = RemoteObject(int(obj["Size"]), str(obj["ETag"]).strip('"'))
        return out

    def upload(
        self,
        local_file: str,
        rel: str,
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        # What client.upload_file does (one transfer manager per file, so each file gets its own parallel
        # parts), with a handle on the transfer: cancelling it aborts a multipart upload in flight.
        from boto3.s3.transfer import ProgressCallbackInvoker
        from s3transfer.exceptions import CancelledError
        from s3transfer.manager import TransferManager

        subscribers = [ProgressCallbackInvoker(progress)] if progress is not None else None
        with TransferManager(self.client, self.transfer) as manager:
            future = manager.upload(local_file, self.bucket, self.prefix + rel, subscribers=subscribers)
            while cancel is not None and not future.done():
                if cancel.wait(0.01):
                    future.cancel()
                    break
            try:
                future.result()
            except CancelledError as e:
                raise UploadCancelled(rel) from e

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + rel)

    def read(self, rel: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=self.prefix + rel)["Body"].read())

    def content_key(self, local_file: str) -> str:
        return s3_etag(local_file, self.part_bytes)


class StorageRemote:
    """Any :class:`Storage` (fsspec URL or local folder): sizes from one ``walk``, sha256 as content key."""

    lists_content_keys = False

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.url = storage.url()

    def listing(self) -> dict[str, RemoteObject]:
        return {rel: RemoteObject(size) for rel, size in self.storage.walk().items()}

    def upload(
        self,
        local_file: str,
        rel: str,
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        if cancel is not None and cancel.is_set():
            raise UploadCancelled(rel)
        self.storage.put(local_file, rel)
        if progress is not None:
            progress(os.path.getsize(local_file))

    def delete(self, rel: str) -> None:
        self.storage.delete(rel)

    def read(self, rel: str) -> bytes:
        return self.storage.read_bytes(rel)

    def content_key(self, local_file: str) -> str:
        from runner.storage.local import sha256_file

        return sha256_file(local_file)


def open_remote(
    url: str, endpoint_url: str = "", region: str = "", client_kwargs: dict[str, Any] | None = None
) -> Remote:
    if url.startswith("s3://"):
        return S3Remote(url, endpoint_url, region, client_kwargs)
    from runner.storage import StoragePlugin

    return StorageRemote(StoragePlugin(endpoint_url=endpoint_url, region=region).open_url(url))
