"""S3 through boto3: the one module that knows S3 (its URLs, its client settings, ETags and errors).

boto3's transfer manager moved a 1 GiB object at 139 MB/s on a local S3 server where ``s3fs.put_file``
managed 59-85 MB/s (shared/notes/bench.md), and an S3 listing returns ETags, which let the syncer compare
content without downloading anything. Every error leaves this module as one of :mod:`.base` (a missing
object as ``FileNotFoundError``), with any AWS credential value blanked from its text.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from runner.storage import checksum
from runner.storage.base import (
    Entry,
    Progress,
    RemoteUnreachable,
    StorageError,
    UploadCancelled,
    download_to,
)

#: Multipart part size and parallel parts per file: on moto, 8 MiB x 16 moved a 100 MB file in ~1.0 s where
#: 16 MiB x 4 took 1.6-2.0 s (bench/sync.py measures the end result against awscli).
PART_BYTES = 8 << 20
PART_CONCURRENCY = 16
#: Pooled connections per client: the syncer's parallel files and their parallel parts share them.
MAX_CONNECTIONS = 64
#: Tries per request. Quick: for a caller with its own retries and backoff that must notice an outage
#: promptly (the syncer). Patient: for one-off calls whose failure stops or degrades the run (resume, history).
QUICK_ATTEMPTS = 2
PATIENT_ATTEMPTS = 5
_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


def scrub(text: str) -> str:
    """``text`` with any credential from the environment blanked (botocore echoes request details)."""
    for var in _SECRETS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """botocore's errors as ours: a missing object is ``FileNotFoundError``, an endpoint that does not answer
    :class:`RemoteUnreachable`, anything else :class:`StorageError`; the text scrubbed of credentials."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    unreachable = (
        EndpointConnectionError,
        ConnectTimeoutError,
        ReadTimeoutError,
        ConnectionClosedError,
        ConnectionError,
        TimeoutError,
    )
    try:
        yield
    except (StorageError, UploadCancelled, FileNotFoundError):
        raise  # Ours already, or a local file that went away.
    except Exception as e:
        text = f"{type(e).__name__}: {scrub(str(e))}"
        if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in _NOT_FOUND:
            raise FileNotFoundError(text) from None
        if isinstance(e, unreachable):
            raise RemoteUnreachable(text) from None
        # NOTE: `from None`: the original exception's text is not scrubbed, so it must not travel along.
        raise StorageError(text) from None


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


@dataclass(frozen=True)
class S3Connection:
    """How to reach S3 or an S3-compatible server (``storage.endpoint_url``, ``region``, ``client_kwargs``),
    built once per run. Credentials come from the environment / AWS credential chain only, never config."""

    endpoint_url: str = ""
    region: str = ""
    #: Extra keyword arguments for the boto3 client (no secrets).
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    def client(self, fail_fast: bool = False) -> Any:
        """A boto3 S3 client; ``fail_fast``: :data:`QUICK_ATTEMPTS` tries per request, else :data:`PATIENT_ATTEMPTS`."""
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = dict(self.client_kwargs)
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            kwargs["region_name"] = self.region
        attempts = QUICK_ATTEMPTS if fail_fast else PATIENT_ATTEMPTS
        kwargs.setdefault(
            "config",
            Config(
                max_pool_connections=MAX_CONNECTIONS,
                retries={"max_attempts": attempts, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        # NOTE: a session of its own: boto3's default session is not thread-safe.
        return boto3.session.Session().client("s3", **kwargs)


class S3Storage:
    """``s3://bucket/prefix`` through boto3 (transfer manager: parallel multipart parts, pooled connections)."""

    lists_content_keys = True

    def __init__(
        self,
        url: str,
        connection: S3Connection | None = None,
        fail_fast: bool = False,
        part_bytes: int = PART_BYTES,
        part_concurrency: int = PART_CONCURRENCY,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        self.root = url.rstrip("/")
        self.bucket, _, prefix = self.root.removeprefix("s3://").partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.client = (connection or S3Connection()).client(fail_fast)
        self.part_bytes = part_bytes
        self.transfer = TransferConfig(
            multipart_threshold=part_bytes,
            multipart_chunksize=part_bytes,
            max_concurrency=part_concurrency,
            use_threads=True,
        )

    def _key(self, path: str) -> str:
        return self.prefix + path

    def _folder(self, path: str) -> str:
        """The key prefix of everything under ``path``."""
        return f"{self.prefix}{path}/" if path else self.prefix

    def _pages(self, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        with _errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._folder(path), **kwargs
            )
            yield from pages

    def url(self, path: str = "") -> str:
        return f"{self.root}/{path}" if path else self.root

    def exists(self, path: str) -> bool:
        if path:
            with contextlib.suppress(FileNotFoundError):
                self.size(path)
                return True
        with _errors():
            found = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._folder(path), MaxKeys=1)
        return int(found.get("KeyCount", 0)) > 0

    def size(self, path: str) -> int:
        with _errors():
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(path))["ContentLength"])

    def list(self, path: str = "") -> list[str]:
        start = len(self._folder(path))
        names: set[str] = set()
        for page in self._pages(path, Delimiter="/"):
            names.update(p["Prefix"][start:].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(obj["Key"][start:] for obj in page.get("Contents", []))
        names.discard("")
        return sorted(names)

    def listing(self, path: str = "") -> dict[str, Entry]:
        start = len(self.prefix)
        return {
            obj["Key"][start:]: Entry(int(obj["Size"]), str(obj["ETag"]).strip('"'))
            for page in self._pages(path)
            for obj in page.get("Contents", [])
        }

    def open(self, path: str) -> IO[bytes]:
        with _errors():
            body: IO[bytes] = self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"]
            return body

    def read_bytes(self, path: str) -> bytes:
        with _errors():
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read())

    def write_bytes(self, path: str, data: bytes) -> None:
        with _errors():
            self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data)

    def put(
        self, local_file: str, path: str, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> None:
        # What client.upload_file does (one transfer manager per file, so each file gets its own parallel
        # parts), with a handle on the transfer: cancelling it aborts a multipart upload in flight.
        from boto3.s3.transfer import ProgressCallbackInvoker
        from s3transfer.exceptions import CancelledError
        from s3transfer.manager import TransferManager

        subscribers = [ProgressCallbackInvoker(progress)] if progress is not None else None
        with _errors(), TransferManager(self.client, self.transfer) as manager:
            future = manager.upload(local_file, self.bucket, self._key(path), subscribers=subscribers)
            while cancel is not None and not future.done():
                if cancel.wait(0.01):
                    future.cancel()
                    break
            try:
                future.result()
            except CancelledError as e:
                raise UploadCancelled(path) from e

    def get(self, path: str, local_file: str) -> None:
        def fetch(tmp: str) -> None:
            with _errors():
                self.client.download_file(self.bucket, self._key(path), tmp, Config=self.transfer)

        download_to(local_file, fetch)

    def delete(self, path: str) -> None:
        """The object ``path`` and everything under ``path/``: one listing, one request per 1000 keys."""
        keys = [self._key(path)] if path else []
        keys += [obj["Key"] for page in self._pages(path) for obj in page.get("Contents", [])]
        with _errors():
            for start in range(0, len(keys), 1000):
                batch = {"Objects": [{"Key": key} for key in keys[start : start + 1000]], "Quiet": True}
                errors = self.client.delete_objects(Bucket=self.bucket, Delete=batch).get("Errors", [])
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"could not delete {len(errors)} objects under {self.url(path)}, e.g. "
                        f"{first.get('Key')}: {first.get('Code')} {scrub(str(first.get('Message')))}"
                    )

    def checksum(self, path: str, algorithm: str = "sha256") -> str:
        with _errors():
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"]
            return checksum.of_stream(body, algorithm)

    def content_key(self, local_file: str) -> str:
        return s3_etag(local_file, self.part_bytes)
