"""The storage settings a run is given: its remote home, if any, reached through one protocol (:mod:`.base`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.config import parse_duration
from runner.storage.base import Entry, RemoteUnreachable, Storage, StorageError
from runner.storage.local import LocalStorage
from runner.storage.s3 import S3Connection, S3Storage

__all__ = ["Entry", "LocalStorage", "RemoteUnreachable", "Storage", "StorageError", "StorageSettings"]


@dataclass(frozen=True)
class StorageSettings:
    """What ``storage=local|s3`` builds (``storage._target_`` is :meth:`from_config`), once per run, in
    :mod:`runner.build`: where the run's remote home is and how to reach it, how often to sync, what not to
    upload. It opens storages by run name or URL; the URL's scheme picks the implementation."""

    #: Remote root for run directories (``s3://bucket/prefix``); empty = local only.
    url: str = ""
    sync_every_s: float = 300.0
    #: Glob patterns (relative to the run directory) never uploaded.
    exclude: list[str] = field(default_factory=list)
    #: How ``s3://`` URLs are reached.
    s3: S3Connection = field(default_factory=S3Connection)

    @classmethod
    def from_config(
        cls,
        url: str = "",
        endpoint_url: str = "",
        region: str = "",
        sync_every: str = "5m",
        exclude: list[str] | None = None,
        client_kwargs: dict[str, Any] | None = None,
    ) -> StorageSettings:
        """From the ``storage.*`` keys (:class:`runner.config.StorageConfig`)."""
        return cls(
            url=url,
            sync_every_s=parse_duration(sync_every, "storage.sync_every"),
            exclude=list(exclude or []),
            s3=S3Connection(endpoint_url, region, dict(client_kwargs or {})),
        )

    def remote(self, name: str, fail_fast: bool = False) -> Storage | None:
        """The remote home of run ``name`` (``<url>/<name>``), or None for local-only runs. ``fail_fast``: few,
        quick retries per request, for a caller that retries by itself and must notice an outage promptly."""
        if not self.url:
            return None
        return self.open_url(f"{self.url.rstrip('/')}/{name}", fail_fast)

    def open_url(self, url: str, fail_fast: bool = False) -> Storage:
        """A storage rooted at an arbitrary URL or path (e.g. ``trainer.resume=s3://...``)."""
        if "://" not in url or url.startswith("file://"):
            return LocalStorage(url.removeprefix("file://"))
        if url.startswith("s3://"):
            return S3Storage(url, self.s3, fail_fast)
        from runner.storage.fsspec import FsspecStorage

        return FsspecStorage(url)
