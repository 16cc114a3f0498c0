"""Where a run continues from: the checkpoints it may resume from, and loading the newest one that is intact.

Candidates are found before any work starts (:func:`find_resume`) and checked by structure only (manifest,
file names and sizes): their bytes are checked once, while they are loaded (:mod:`runner.checkpoint.load`), instead of
read once to hash and again to load. A candidate that fails its checksums while loading is skipped with a
warning naming the file, and the state it was being loaded into is built afresh before the next candidate
(:func:`load_newest`), so a run never continues from a half-loaded state.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from runner import distributed
from runner.checkpoint.errors import CheckpointError, CorruptCheckpoint, one_line
from runner.checkpoint.layout import MANIFEST, step_dir
from runner.checkpoint.load import load
from runner.checkpoint.manifest import CheckpointRef, ref_at, valid_refs, verify
from runner.checkpoint.state import TrainState
from runner.config import TrainerConfig
from runner.storage import LocalStorage, StorageSettings

log = logging.getLogger("runner")

_P = TypeVar("_P")


@dataclass
class ResumePlan:
    """Where a run may continue from, found before any work starts (see :func:`find_resume`)."""

    #: Local checkpoints, newest first, listed as they are tried (the one ``trainer.resume`` names, if local,
    #: verified in full).
    local: Iterable[CheckpointRef] = ()
    #: Remote checkpoints newer than the newest local one, newest first: their bytes are verified once, in
    #: the downloaded copy (:meth:`candidates`), instead of streamed once to hash and again to download.
    remote: list[CheckpointRef] = field(default_factory=list)
    #: False when ``auto`` could not list the run's remote.
    checked: bool = True
    #: ``trainer.resume`` named a checkpoint: if it does not verify, that is an error, not a skip.
    explicit: bool = False

    def candidates(self) -> Iterator[CheckpointRef]:
        """Checkpoints to try, newest first: the remote ones (newer than any local one), then the local ones."""
        yield from self.remote
        yield from self.local

    def skip(self, ref: CheckpointRef, error: CorruptCheckpoint) -> None:
        if self.explicit:
            raise CheckpointError(f"trainer.resume={ref.source} is not a valid checkpoint: {error}") from None
        log.warning("skipping checkpoint %s: %s", ref.source, error)


def find_resume(trainer: TrainerConfig, run_dir: str, settings: StorageSettings, name: str) -> ResumePlan:
    """The checkpoints to continue from, per ``trainer.resume`` (auto / none / a path or URL)."""
    choice = trainer.resume.strip()
    if choice == "none":
        return ResumePlan()
    if choice != "auto":
        target = choice.rstrip("/")
        if "://" not in target:
            target = os.path.abspath(target)
        parent, _, folder = target.rpartition("/")
        storage = settings.open_url(parent)
        # NOTE: a checkpoint named by the user is verified in full now, so a damaged one is an error before
        # the run directory is created, not after.
        if isinstance(storage, LocalStorage):
            return ResumePlan(local=[ref_at(storage, folder)], explicit=True)
        return ResumePlan(remote=[ref_at(storage, folder, checksums=False)], explicit=True)
    local = valid_refs(LocalStorage(run_dir), checksums=False)
    newest = next(local, None)
    plan = ResumePlan(local=itertools.chain([newest], local) if newest is not None else ())
    remote = settings.remote(name)
    if remote is not None:
        try:
            newer = newest.step if newest is not None else -1
            plan.remote = list(valid_refs(remote, checksums=False, newer_than=newer))
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
    announce: Callable[[CheckpointRef], None] = lambda ref: None,
) -> tuple[_P, TrainState, CheckpointRef | None]:
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
            local = ref if isinstance(ref.storage, LocalStorage) else fetch(ref, folder)
            load(local, state)
            return parts, state, local
        except CorruptCheckpoint as e:
            plan.skip(ref, e)
            parts, state = build()
    return parts, state, None


# --------------------------------------------------------------------------- the only download path
def fetch(ref: CheckpointRef, folder: str) -> CheckpointRef:
    """A verified local copy of remote checkpoint ``ref`` in ``folder`` (the run's checkpoints folder).

    Collective when distributed: local rank 0 of each node downloads and verifies (ranks on a node share
    its disk), the others wait; a failure anywhere raises on every rank: :class:`CorruptCheckpoint` if a
    downloaded copy does not match its manifest, :class:`CheckpointError` if the download failed.
    """
    local_dir = os.path.join(folder, step_dir(ref.step))
    error, corrupt = None, False
    if distributed.local_rank() == 0:
        log.info("downloading checkpoint %s to %s", ref.url, local_dir)
        try:
            download(ref, local_dir)
        except CorruptCheckpoint as e:
            error, corrupt = str(e), True
        except Exception as e:
            error = f"could not download {ref.url}: {one_line(e)}"
    error = distributed.first_error(error)
    corrupt = distributed.any_true(corrupt)
    if error is not None:
        raise (CorruptCheckpoint if corrupt else CheckpointError)(error)
    with open(os.path.join(local_dir, MANIFEST), "rb") as f:
        manifest = json.load(f)  # The copy's own (verified) manifest: the remote may have moved on since.
    parent, _, name = local_dir.rpartition(os.sep)
    return CheckpointRef(ref.step, LocalStorage(parent), name, manifest, origin=ref.url)


def download(ref: CheckpointRef, local_dir: str) -> None:
    """Fetch a remote checkpoint into ``local_dir`` (atomically: ``.tmp`` then rename) and re-verify it."""
    if os.path.isdir(local_dir) and verify(LocalStorage(local_dir), "")[0] is not None:
        return
    # A name of its own: nodes that share a file system may download the same checkpoint at once.
    tmp = f"{local_dir}.{socket.gethostname()}-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ref.manifest["files"]:
        ref.storage.get(f"{ref.path}/{name}", os.path.join(tmp, name))
    ref.storage.get(f"{ref.path}/{MANIFEST}", os.path.join(tmp, MANIFEST))
    manifest, reason = verify(LocalStorage(tmp), "")
    if manifest is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorruptCheckpoint(f"{reason} (in the downloaded copy)")
    os.makedirs(os.path.dirname(local_dir), exist_ok=True)
    if os.path.isdir(local_dir):
        if verify(LocalStorage(local_dir), "")[0] is not None:  # another node got there first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(local_dir, ignore_errors=True)
    os.replace(tmp, local_dir)
