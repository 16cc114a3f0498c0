"""Where a checkpoint lives in a run directory (local or remote), declared once.

``<run>/checkpoints/step_<N>/`` holds the DCP files, one ``rank_<r>.json`` per rank and ``manifest.json``,
written last: a folder without a valid manifest is not a checkpoint. Locally a checkpoint is written into
``step_<N>.tmp/`` and renamed into place, so anything ending in ``.tmp`` is work in progress (a save, a
download, a retirement) that nothing else may read or upload. The syncer (:mod:`runner.sync`) reads these
names from here.
"""

from __future__ import annotations

import re

FORMAT = "runner-checkpoint/1"
MANIFEST = "manifest.json"
CKPT_DIR = "checkpoints"
#: Suffix of a folder being written, downloaded or deleted: never a checkpoint, never uploaded.
PARTIAL = ".tmp"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(step: int) -> str:
    return f"step_{step}"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.json"


def step_of(name: str) -> int | None:
    """12 for ``step_12`` (or a path ending in it), None for anything else."""
    match = _STEP_DIR.match(name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def folder(step: int) -> str:
    """Run-relative folder of checkpoint ``step``: ``checkpoints/step_<N>``."""
    return f"{CKPT_DIR}/{step_dir(step)}"


def manifest_of(step: int) -> str:
    """Run-relative path of checkpoint ``step``'s manifest."""
    return f"{folder(step)}/{MANIFEST}"


def folder_of(rel: str) -> str | None:
    """``checkpoints/step_N`` for a run-relative file inside a checkpoint folder, else None."""
    parts = rel.split("/")
    if len(parts) < 3 or parts[0] != CKPT_DIR or step_of(parts[1]) is None:
        return None
    return "/".join(parts[:2])


def manifest_step(rel: str) -> int | None:
    """N if ``rel`` is the manifest of checkpoint N (``checkpoints/step_N/manifest.json``), else None."""
    owner = folder_of(rel)
    return step_of(owner) if owner is not None and rel == f"{owner}/{MANIFEST}" else None


def is_partial(rel: str) -> bool:
    """True for anything inside (or named as) a folder in progress, or a file being downloaded."""
    parts = rel.split("/")
    return any(p.endswith(PARTIAL) for p in parts) or parts[-1].endswith(".part")
