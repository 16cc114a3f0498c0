"""A synthetic dataset that pauses training at chosen points until the test lets it go on.

Tests that must act *while* a run is at a given point (stop the S3 server after a checkpoint reached the
remote, restart it before the run ends) cannot rely on wall-clock timing: a fast machine finishes the run
before the test acts, a slow one never gets there. With ``data._target_=tests.gated_data.gated_splits`` and
``RUNNER_TEST_GATES=<items>:<path>,...`` the training split blocks before fetching item number ``<items>``
until the file ``<path>`` exists, and writes ``<path>.reached`` when it starts waiting.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from torch.utils.data import Dataset

from runner.train.data import Sample, Splits, synthetic_splits

ENV = "RUNNER_TEST_GATES"
TIMEOUT_S = 300.0


class Gated(Dataset[Sample]):
    def __init__(self, inner: Dataset[Sample], gates: list[tuple[int, Path]]) -> None:
        self.inner, self.gates, self.fetched = inner, sorted(gates), 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Sample:
        for at, path in self.gates:
            if self.fetched == at and not path.exists():
                Path(f"{path}.reached").touch()
                deadline = time.monotonic() + TIMEOUT_S
                while not path.exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"test gate {path} was not opened within {TIMEOUT_S:.0f}s")
                    time.sleep(0.02)
        self.fetched += 1
        return self.inner[key]


def gated_splits(**kwargs: object) -> Splits:
    """``runner.train.data.synthetic_splits`` with the training split gated as ``RUNNER_TEST_GATES`` says."""
    splits = synthetic_splits(**kwargs)  # type: ignore[arg-type]
    gates = []
    for spec in filter(None, os.environ.get(ENV, "").split(",")):
        at, _, path = spec.partition(":")
        gates.append((int(at), Path(path)))
    return dataclasses.replace(splits, train=Gated(splits.train, gates))
