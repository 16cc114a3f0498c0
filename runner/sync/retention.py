"""Remote retention: a run's own checkpoints on its remote, bounded to the newest ``keep_latest_k``.

After a pass, checkpoints of this run beyond the newest ``keep_latest_k`` remote ones are deleted
(manifest first, so a half-deleted checkpoint is never valid), except any step in ``protect`` and the
newest remote checkpoint. "Of this run": uploaded by this syncer, or (with ``owner``, the run's config
hash) written by an earlier process of the same run, as a requeued or restarted job finds them: their
manifest names the same config hash. Anything else under the prefix (another run's checkpoints, a
manifest that cannot be read) is left alone. Local retention is :mod:`runner.checkpoint.retention`.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable

from runner.checkpoint import layout
from runner.checkpoint.manifest import config_hash_of
from runner.storage.base import Storage

log = logging.getLogger(__name__)


def _steps(rels: Iterable[str]) -> list[int]:
    """Steps of the checkpoint manifests among ``rels``, newest first."""
    return sorted({step for rel in rels if (step := layout.manifest_step(rel)) is not None}, reverse=True)


class RemoteRetention:
    """Keeps ``keep_latest_k`` remote checkpoints of a run (0: all). Used by one pass at a time."""

    def __init__(
        self, remote: Storage, keep_latest_k: int, protect: set[int] | None = None, owner: str | None = None
    ) -> None:
        self.remote = remote
        self.keep_latest_k = keep_latest_k
        self.protect = set(protect or ())
        self.owner = owner
        #: Steps whose manifest this syncer uploaded.
        self.written: set[int] = set()
        #: Remote checkpoints not uploaded by this syncer: step -> written by this run (manifest read once).
        self._owned: dict[int, bool] = {}

    def superseded(self, local: Iterable[str], listing: Container[str]) -> set[int]:
        """Committed local checkpoints already beyond ``keep_latest_k`` and not on the remote yet.

        Uploading them would only feed remote retention: when passes fall behind fast checkpoints, the
        backlog (not the newest checkpoint) would decide how stale the remote is.
        """
        if self.keep_latest_k < 1:
            return set()
        beyond = _steps(local)[self.keep_latest_k :]
        return {s for s in beyond if s not in self.protect and layout.manifest_of(s) not in listing}

    def apply(self, present: Iterable[str]) -> tuple[list[str], dict[str, str]]:
        """Delete what this run no longer keeps among the remote checkpoints ``present`` (the listing and what
        the pass uploaded). Returns the folders deleted and, by folder, the deletions that failed."""
        deleted: list[str] = []
        failed: dict[str, str] = {}
        valid = _steps(present)
        if self.keep_latest_k < 1 or not valid:
            return deleted, failed
        keep = set(valid[: self.keep_latest_k]) | self.protect | {valid[0]}
        for step in sorted(s for s in valid if s not in keep):
            folder = layout.folder(step)
            try:
                if not self._of_this_run(step):
                    continue
                # Manifest first: from that moment the remote copy is no longer a checkpoint.
                self.remote.delete(layout.manifest_of(step))
                self.remote.delete(folder)
            except Exception as e:
                failed[folder] = f"retention of old remote checkpoint {folder} failed: {type(e).__name__}: {e}"
                continue
            self.written.discard(step)
            self._owned.pop(step, None)
            deleted.append(folder)
            log.info("retention: deleted remote checkpoint %s", self.remote.url(folder))
        return deleted, failed

    def _of_this_run(self, step: int) -> bool:
        if step in self.written:
            return True
        if self.owner is None:
            return False
        if step not in self._owned:
            # NOTE: an error reading it (the remote went away) propagates: apply() reports it in the pass
            # result, and the next pass asks again. A manifest that does not parse is not ours to delete.
            self._owned[step] = config_hash_of(self.remote.read_bytes(layout.manifest_of(step))) == self.owner
        return self._owned[step]
