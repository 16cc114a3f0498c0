"""Where a run continues from: the checkpoints it may resume from, and loading the newest one that is intact.

Candidates are found before any work starts (:func:`find_resume`) and checked by structure only (manifest,
file names and sizes): their bytes are checked once, while they are loaded (:mod:`runner.reading`), instead of
read once to hash and again to load. A candidate that fails its checksums while loading is skipped with a
warning naming the file, and the state it was being loaded into is built afresh before the next candidate
(:func:`load_newest`), so a run never continues from a half-loaded state.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from runner import checkpoint
from runner.config import TrainerConfig
from runner.state import TrainState
from runner.storage import LocalStorage, StoragePlugin

log = logging.getLogger("runner")

_P = TypeVar("_P")


@dataclass
class ResumePlan:
    """Where a run may continue from, found before any work starts (see :func:`find_resume`)."""

    #: Local checkpoints, newest first, listed as they are tried (the one ``trainer.resume`` names, if local,
    #: verified in full).
    local: Iterable[checkpoint.CheckpointRef] = ()
    #: Remote checkpoints newer than the newest local one, newest first: their bytes are verified once, in
    #: the downloaded copy (:meth:`candidates`), instead of streamed once to hash and again to download.
    remote: list[checkpoint.CheckpointRef] = field(default_factory=list)
    #: False when ``auto`` could not list the run's remote.
    checked: bool = True
    #: ``trainer.resume`` named a checkpoint: if it does not verify, that is an error, not a skip.
    explicit: bool = False

    def candidates(self) -> Iterator[checkpoint.CheckpointRef]:
        """Checkpoints to try, newest first: the remote ones (newer than any local one), then the local ones."""
        yield from self.remote
        yield from self.local

    def skip(self, ref: checkpoint.CheckpointRef, error: checkpoint.CorruptCheckpoint) -> None:
        if self.explicit:
            raise checkpoint.CheckpointError(
                f"trainer.resume={ref.source} is not a valid checkpoint: {error}"
            ) from None
        log.warning("skipping checkpoint %s: %s", ref.source, error)


def find_resume(trainer: TrainerConfig, run_dir: str, plugin: StoragePlugin, name: str) -> ResumePlan:
    """The checkpoints to continue from, per ``trainer.resume`` (auto / none / a path or URL)."""
    choice = trainer.resume.strip()
    if choice == "none":
        return ResumePlan()
    if choice != "auto":
        target = choice.rstrip("/")
        if "://" not in target:
            target = os.path.abspath(target)
        parent, _, folder = target.rpartition("/")
        storage = plugin.open_url(parent)
        # NOTE: a checkpoint named by the user is verified in full now, so a damaged one is an error before
        # the run directory is created, not after.
        if isinstance(storage, LocalStorage):
            return ResumePlan(local=[checkpoint.ref_at(storage, folder)], explicit=True)
        return ResumePlan(remote=[checkpoint.ref_at(storage, folder, checksums=False)], explicit=True)
    local = checkpoint.valid_refs(LocalStorage(run_dir), checksums=False)
    newest = next(local, None)
    plan = ResumePlan(local=itertools.chain([newest], local) if newest is not None else ())
    remote = plugin.remote(name)
    if remote is not None:
        try:
            newer = newest.step if newest is not None else -1
            plan.remote = list(checkpoint.valid_refs(remote, checksums=False, newer_than=newer))
        except Exception as e:  # An unreachable remote must not stop a run that has a local copy.
            plan.checked = False
            log.warning(
                "could not look for checkpoints at %s: %s. Training starts from what is local; nothing is "
                "uploaded until the remote is reachable and holds no newer checkpoint of this run",
                remote.url(),
                e,
            )
    return plan


def load_newest(
    plan: ResumePlan,
    folder: str,
    build: Callable[[], tuple[_P, TrainState]],
    announce: Callable[[checkpoint.CheckpointRef], None] = lambda ref: None,
) -> tuple[_P, TrainState, checkpoint.CheckpointRef | None]:
    """Build the run's parts and state, and load the newest candidate of ``plan`` that is intact into it.

    Returns the parts, the state and the checkpoint loaded (None: starting fresh). ``announce(ref)`` is called
    before each candidate is downloaded (a remote one, into ``folder``; collective: one download per node) and
    loaded, so the first thing a resumed run says is where it resumes from. ``build`` is called again after a
    candidate fails its checksums: a load may have overwritten part of the state.
    """
    parts, state = build()
    for ref in plan.candidates():
        announce(ref)
        try:
            local = ref if isinstance(ref.storage, LocalStorage) else checkpoint.fetch(ref, folder)
            checkpoint.load(local, state, scratch=folder)
            return parts, state, local
        except checkpoint.CorruptCheckpoint as e:
            plan.skip(ref, e)
            parts, state = build()
    return parts, state, None
