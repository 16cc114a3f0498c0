"""Metric sinks: metrics.jsonl (crash-safe, what the sweep report reads) and TensorBoard.

Rank choice lives in :func:`make_sink` only: non-zero ranks get a sink that does nothing, so the
training loop never asks which rank it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Sink(Protocol):
    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None: ...

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        pass

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per line; appended and flushed per record, so a crash loses nothing logged."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close())

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        record = {"step": step, "split": prefix, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"split": "hparams", "hparams": hparams, "metrics": metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """TensorBoard events. ``torch.utils.tensorboard`` takes seconds to import, so it is imported in a
    background thread at start-up; scalars logged before the import is done are kept in memory and
    written at the first log call after it (or at close), so the loop never waits for the import."""

    def __init__(self, logdir: str, purge_step: int | None = None) -> None:
        self.logdir = logdir
        #: Events of this step and later in earlier event files are hidden (a resumed run replays them).
        self.purge_step = purge_step
        self._writer: Any = None
        self._early: list[tuple[str, float, int]] = []
        self._ready = threading.Thread(target=self._import, name="tb-import", daemon=True)
        self._ready.start()

    def _import(self) -> None:
        import torch.utils.tensorboard  # noqa: F401

    def _w(self) -> Any:
        if self._writer is None:
            self._ready.join()
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.logdir, flush_secs=30, purge_step=self.purge_step)
            for tag, value, step in self._early:
                self._writer.add_scalar(tag, value, step)
            self._early.clear()
        return self._writer

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self._writer is None and self._ready.is_alive():
            self._early.extend((f"{prefix}/{key}", value, step) for key, value in values.items())
            return
        w = self._w()
        for key, value in values.items():
            w.add_scalar(f"{prefix}/{key}", value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        clean = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()}
        self._w().add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")

    def close(self) -> None:
        if self._writer is None and self._early:
            self._w()
        if self._writer is not None:
            self._writer.close()


class FanOut:
    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        for s in self.sinks:
            s.log(step, values, prefix)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.hparams(hparams, metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def make_sink(run_dir: str, rank: int, tensorboard: bool = True, purge_step: int | None = None) -> Sink:
    """Rank 0's metrics.jsonl and TensorBoard; ``purge_step``: the first step this process logs (a resumed
    run's history past its checkpoint was dropped, see :mod:`runner.history`)."""
    if rank != 0:
        return NullSink()
    os.makedirs(run_dir, exist_ok=True)
    sinks: list[Sink] = [JsonlSink(os.path.join(run_dir, "metrics.jsonl"))]
    if tensorboard:
        sinks.append(TensorBoardSink(os.path.join(run_dir, "tb"), purge_step))
    return FanOut(*sinks)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a re-logged step (after a resume) replaces the earlier record."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping a torn line in %s", path)
                continue
            if "step" in record:
                latest[(record["split"], int(record["step"]))] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["split"]))
