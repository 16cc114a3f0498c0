"""Local retention: keep the newest ``keep_latest_k`` committed checkpoints, delete the rest safely.

Deleted only once committed and, with a remote, confirmed there (or superseded by a newer checkpoint that
is): the syncer says which (``uploaded``). Each doomed folder is renamed first, so a crash mid-delete leaves a
``*.tmp`` folder that the next start cleans up, never a half-deleted ``step_<N>`` that still looks committed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

from runner.checkpoint.layout import MANIFEST, PARTIAL, step_dir, step_of

log = logging.getLogger("runner.checkpoint")


def committed(folder: str) -> list[int]:
    """Steps of the committed checkpoints in ``folder`` (a run's ``checkpoints/``), newest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    steps = [s for name in names if (s := step_of(name)) is not None]
    return sorted((s for s in steps if os.path.exists(os.path.join(folder, step_dir(s), MANIFEST))), reverse=True)


def retire(
    folder: str,
    keep_latest_k: int,
    uploaded: Callable[[int], bool] | None = None,
    protect: set[int] | None = None,
) -> list[int]:
    """Delete all but the newest ``keep_latest_k`` committed checkpoints (never one in ``protect``, never one
    ``uploaded`` says is not on the remote yet). Returns the steps deleted."""
    doomed = [s for s in committed(folder)[keep_latest_k:] if s not in (protect or set())]
    if uploaded is not None:
        waiting = [s for s in doomed if not uploaded(s)]
        if waiting:
            log.debug("keeping old checkpoints %s locally until they are confirmed uploaded", waiting)
        doomed = [s for s in doomed if s not in waiting]
    for s in doomed:
        retired = os.path.join(folder, f"{step_dir(s)}.retired{PARTIAL}")
        os.replace(os.path.join(folder, step_dir(s)), retired)
        shutil.rmtree(retired, ignore_errors=True)
    return doomed
