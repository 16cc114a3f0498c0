"""A run's history (``metrics.jsonl``, TensorBoard events, logs) across resumes, wherever they happen.

A resumed process appends to the files its predecessors wrote, and the syncer mirrors them to the remote
under the same names. Two things go wrong without care:

* on a new machine (or one whose copy is behind the remote's) the process would start these files afresh,
  and the first sync would overwrite the remote's history with the new, short one;
* records of the steps between the resumed checkpoint and the moment the previous process died are
  logged again when those steps are replayed, so a reader would see them twice.

So before training resumes, history follows the checkpoint: if the run continues from a remote checkpoint
(newer than any local one), the remote's history files replace the local ones; otherwise the local ones are
kept and only the missing ones are fetched. Then ``metrics.jsonl`` is rewound to the resumed step: records
past it, written by a process that died before its next checkpoint, are **dropped** (those steps are trained
and logged again, identically); TensorBoard hides them too (``purge_step`` on the new event file).

A remote that was unreachable at start is handled by the syncer's guard (it uploads nothing while the remote
may hold a newer checkpoint of the run); when it holds none, the local history is the newest there is.
"""

from __future__ import annotations

import json
import logging
import os

from runner.storage.base import Storage
from runner.storage.local import atomic_write

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
#: Remote folders that are not history: checkpoints are resumed through their own path, .hydra/ is rewritten.
_NOT_HISTORY = ("checkpoints/", ".hydra/")


class HistoryError(RuntimeError):
    """The run's history could not be read from the remote it resumes from; starting anyway would let the
    first sync overwrite it."""


def _is_history(rel: str, rank: int) -> bool:
    if rel.startswith(_NOT_HISTORY) or ".replaced-" in rel:
        return False
    if rel.startswith("logs/"):  # every rank fetches only its own log (it alone writes it)
        return rel == f"logs/rank{rank}.log"
    return rank == 0  # metrics and TensorBoard are rank 0's


def fetch(remote: Storage, run_dir: str, rank: int, replace: bool) -> list[str]:
    """Bring this rank's history files from ``remote`` into ``run_dir`` before anything appends to them.

    ``replace``: the run resumes from a remote checkpoint, so the remote's copies win over local ones;
    otherwise only files missing locally are fetched. Returns the files fetched. Raises
    :class:`HistoryError` if the remote cannot be read.
    """
    try:
        found = remote.listing()
        wanted = [
            rel
            for rel in sorted(found)
            if _is_history(rel, rank) and (replace or not os.path.exists(os.path.join(run_dir, rel)))
        ]
        for rel in wanted:
            remote.get(rel, os.path.join(run_dir, rel))
    except Exception as e:
        raise HistoryError(
            f"could not read this run's history (metrics.jsonl, tb/, logs/) from {remote.url()}: "
            f"{type(e).__name__}: {e}. Nothing was written; rerun the same command once the remote answers"
        ) from e
    if wanted:
        # NOTE: debug: a resumed run's first line says where it resumes from (see runner.checkpoint.resume).
        log.debug("fetched %d history files of this run from %s", len(wanted), remote.url())
    return wanted


def rewind(run_dir: str, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` past ``step`` (and torn lines); returns how many were dropped.

    ``step`` is the step the run resumes from (0 when it starts afresh): every record past it belongs to a
    process that died before saving it, and is logged again when the step is replayed.
    """
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    kept: list[bytes] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line, from a kill mid-write
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    dropped = len([line for line in lines if line.strip()]) - len(kept)
    if dropped:
        atomic_write(path, b"".join(line + b"\n" for line in kept))
        log.info("%s: dropped %d records past step %d (those steps run again)", path, dropped, step)
    return dropped
