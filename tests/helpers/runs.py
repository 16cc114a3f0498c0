"""What a run left on disk: its committed checkpoints and their tensors."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from runner.checkpoint.load import read_tensors


def committed_steps(run_dir: Path) -> set[int]:
    """Steps with a committed ``checkpoints/step_<N>`` folder (renamed into place once its manifest was in).

    Folders are not filtered by their manifest: a test that looks for torn checkpoints must see them all."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name))}


def final_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of the run's checkpoint at ``step``, by name."""
    return read_tensors(str(run_dir / "checkpoints" / f"step_{step}"))
