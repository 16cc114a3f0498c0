"""TensorBoard must never make the loop wait for its (seconds-long) import, and must lose no scalar."""

from __future__ import annotations

import threading
from pathlib import Path

from runner.train.metrics import TensorBoardSink


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_logged_during_the_import_are_kept_and_written(tmp_path: Path) -> None:
    sink = TensorBoardSink(str(tmp_path))
    sink._ready.join()
    importing = threading.Event()
    sink._ready = threading.Thread(target=importing.wait, daemon=True)  # an import still running
    sink._ready.start()
    sink.log(10, {"loss": 2.5})
    sink.log(20, {"loss": 2.0})
    assert sink._writer is None  # nothing waited for the import
    importing.set()
    sink._ready.join()
    sink.log(30, {"loss": 1.5})
    sink.close()
    assert scalars(tmp_path)["train/loss"] == [(10, 2.5), (20, 2.0), (30, 1.5)]


def test_close_writes_scalars_still_waiting(tmp_path: Path) -> None:
    sink = TensorBoardSink(str(tmp_path))
    sink._ready.join()
    importing = threading.Event()
    sink._ready = threading.Thread(target=importing.wait, daemon=True)
    sink._ready.start()
    sink.log(5, {"lr": 0.25})
    importing.set()
    sink.close()
    assert scalars(tmp_path)["train/lr"] == [(5, 0.25)]
