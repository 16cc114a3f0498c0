"""The manifest: what makes a folder a checkpoint, and how one is checked and found.

``manifest.json`` is written last, after every other file of the checkpoint is complete: format, step, world
size, the config hash of what is trained, library versions, and every file's size and checksum. A folder
without one, or whose files do not match it, is not a checkpoint. :func:`verify` checks the structure (and,
unless told not to, every byte); :func:`valid_refs` lists the checkpoints of a run that pass, newest first,
naming each one skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from runner.checkpoint.errors import CheckpointError
from runner.checkpoint.layout import CKPT_DIR, FORMAT, MANIFEST, folder, rank_file, step_of
from runner.storage import checksum
from runner.storage.base import Storage

log = logging.getLogger("runner.checkpoint")

#: Files hashed at once when verifying a checkpoint.
VERIFY_THREADS = 4


# --------------------------------------------------------------------------- verification
@dataclass(frozen=True)
class CheckpointRef:
    step: int
    #: Storage holding the checkpoint folder, and the folder's path inside it.
    storage: Storage
    path: str
    manifest: dict[str, Any]
    #: Where it came from, if this is a local copy of a remote checkpoint (see :func:`runner.checkpoint.resume.fetch`).
    origin: str = ""

    @property
    def url(self) -> str:
        return self.storage.url(self.path)

    @property
    def source(self) -> str:
        """Where the checkpoint came from, for messages: the remote URL of a downloaded copy."""
        return self.origin or self.url


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def verify(storage: Storage, path: str, checksums: bool = True) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") if the checkpoint at ``path`` is complete and intact, else (None, reason).

    ``checksums=False`` checks the structure only (manifest, file names and sizes): for a remote checkpoint
    that is about to be downloaded, whose bytes are checked once, in the local copy
    (:func:`runner.checkpoint.resume.fetch`).
    """
    if not storage.exists(_join(path, MANIFEST)):
        return None, f"no {MANIFEST} (incomplete or not a checkpoint)"
    try:
        manifest = json.loads(storage.read_bytes(_join(path, MANIFEST)))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("unknown format")
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{MANIFEST} is malformed ({e})"
    named = step_of(path)
    if named is not None and named != step:
        return None, f"{MANIFEST} says step {step} but the folder is {path}"
    for name, info in sorted(files.items()):
        if "/" in name or name.startswith(".."):
            return None, f"{MANIFEST} names an unsafe path {name!r}"
        target = _join(path, name)
        if not storage.exists(target):
            return None, f"{name} is missing"
        if storage.size(target) != int(info["size"]):
            return None, f"{name} has {storage.size(target)} bytes, manifest says {info['size']}"
    if ".metadata" not in files or rank_file(0) not in files:
        return None, f"{MANIFEST} lists no .metadata or {rank_file(0)}"
    if not checksums:
        return manifest, ""
    # Checksums last (they read every byte), one file per thread: hashlib and file reads release the GIL,
    # so the data files (one per DCP writer thread) are hashed side by side.
    names = sorted(files)
    try:
        algorithms = {name: checksum.algorithm_of(str(files[name]["checksum"])) for name in names}
    except checksum.UnknownChecksum as e:
        return None, f"{MANIFEST} has {e} (written by a newer runner?)"
    with ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, len(names)), thread_name_prefix="verify") as pool:
        sums = list(pool.map(lambda name: storage.checksum(_join(path, name), algorithms[name]), names))
    for name, digest in zip(names, sums, strict=True):
        if digest != files[name]["checksum"]:
            return None, f"{name} fails its checksum"
    return manifest, ""


def list_steps(storage: Storage) -> list[int]:
    steps = [s for name in storage.list(CKPT_DIR) if (s := step_of(name)) is not None]
    return sorted(steps, reverse=True)


def valid_refs(storage: Storage, checksums: bool = True, newer_than: int = -1) -> Iterator[CheckpointRef]:
    """Checkpoints newer than ``newer_than`` that verify, newest first; each one skipped is named in a
    warning with the reason. ``checksums=False``: see :func:`verify`."""
    for step in list_steps(storage):
        if step <= newer_than:
            return
        path = folder(step)
        manifest, reason = verify(storage, path, checksums)
        if manifest is not None:
            yield CheckpointRef(step, storage, path, manifest)
        else:
            log.warning("skipping checkpoint %s: %s", storage.url(path), reason)


def newest_valid(storage: Storage) -> CheckpointRef | None:
    """Newest checkpoint that verifies; each one skipped is named in a warning with the reason."""
    return next(valid_refs(storage), None)


def ref_at(storage: Storage, path: str, checksums: bool = True, named: str = "trainer.resume=") -> CheckpointRef:
    """An explicitly named checkpoint (``trainer.resume=<path>``, or ``named`` + path for another command):
    invalid is an error, not a skip."""
    where = f"{named}{storage.url(path)}"
    if not storage.exists(path):
        hint = ", or use trainer.resume=auto" if named == "trainer.resume=" else ""
        raise CheckpointError(
            f"{where}: no such checkpoint (nothing at that path); name a step_<N> folder of a run's checkpoints{hint}"
        )
    manifest, reason = verify(storage, path, checksums)
    if manifest is None:
        raise CheckpointError(f"{where} is not a valid checkpoint: {reason}")
    return CheckpointRef(int(manifest["step"]), storage, path, manifest)


def config_hash(sections: dict[str, Any], seed: int) -> str:
    """Hash of what is trained (model, opt, sched, data, seed), as manifests record it: not of cadence or
    storage settings. The syncer's remote retention recognises a run's own checkpoints by it."""
    keep = dict(sections)
    keep["seed"] = int(seed)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash_of(manifest: bytes) -> str | None:
    """The config hash a manifest records, or None if it is not a manifest this version can read."""
    try:
        parsed = json.loads(manifest)
    except ValueError:
        return None
    value = parsed.get("config_hash") if isinstance(parsed, dict) else None
    return value if isinstance(value, str) else None


def create(step: int, world: int, config_hash: str, files: dict[str, dict[str, Any]], replicated: bool) -> bytes:
    """A manifest for checkpoint ``step`` over ``files`` (name -> size and checksum)."""
    import torch

    from runner import __version__

    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": world,
        # True when every rank holds the whole model (DDP): the tensors load at any world size as they are.
        "replicated": replicated,
        "config_hash": config_hash,
        "versions": {"runner": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    return json.dumps(manifest, indent=1).encode()


def files_of(tmp: str, known: Any) -> dict[str, dict[str, Any]]:
    """Size and checksum of every file in ``tmp``; ``known(path)`` gives those hashed while they were written."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        full = os.path.join(tmp, name)
        digest = known(full) or checksum.of_file(full, checksum.MANIFEST_ALGORITHM)
        files[name] = {"size": os.path.getsize(full), "checksum": digest}
    return files
