"""Storage plugin: the local run directory, optionally mirrored to a remote URL."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.config import parse_duration
from runner.storage.base import Storage, StorageError
from runner.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "StorageError", "StoragePlugin", "build_storage"]


@dataclass
class StoragePlugin:
    """What ``storage=local|s3`` builds: knows the remote root; opens per-run storages by name."""

    url: str = ""
    endpoint_url: str = ""
    region: str = ""
    sync_every_s: float = 300.0
    exclude: list[str] = field(default_factory=list)
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def has_remote(self) -> bool:
        return bool(self.url)

    def remote(self, name: str) -> Storage | None:
        """The remote home of run ``name`` (``<url>/<name>``), or None for local-only runs."""
        if not self.url:
            return None
        from runner.storage.fsspec import FsspecStorage

        return FsspecStorage(
            f"{self.url.rstrip('/')}/{name}",
            endpoint_url=self.endpoint_url,
            region=self.region,
            client_kwargs=self.client_kwargs,
        )

    def open_url(self, url: str) -> Storage:
        """A storage rooted at an arbitrary URL or path (e.g. ``trainer.resume=s3://...``)."""
        if "://" not in url or url.startswith("file://"):
            return LocalStorage(url.removeprefix("file://"))
        from runner.storage.fsspec import FsspecStorage

        return FsspecStorage(url, endpoint_url=self.endpoint_url, region=self.region, client_kwargs=self.client_kwargs)


def build_storage(
    url: str = "",
    endpoint_url: str = "",
    region: str = "",
    sync_every: str = "5m",
    exclude: list[str] | None = None,
    client_kwargs: dict[str, Any] | None = None,
) -> StoragePlugin:
    return StoragePlugin(
        url=url,
        endpoint_url=endpoint_url,
        region=region,
        sync_every_s=parse_duration(sync_every, "storage.sync_every"),
        exclude=list(exclude or []),
        client_kwargs=dict(client_kwargs or {}),
    )
