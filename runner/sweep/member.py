"""A sweep member's own ledger events: started, progress (at the log cadence), finished or failed.

:func:`current` says whether this process is rank 0 of a sweep member (Hydra multirun) and, if so, returns
the writer; otherwise ``None``, and nothing is written. The training loop never sees this module: progress
reaches the ledger through a metric sink (:class:`ProgressSink`), like every other metric.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from runner.sweep import ledger

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """``<array>_<index>`` for an array member (what sacct and scancel take), else the job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


class MemberLedger:
    def __init__(self, sweep_dir: str, overrides: list[str], index: int | None, run_dir: str) -> None:
        self.sweep_dir, self.overrides, self.index, self.run_dir = sweep_dir, overrides, index, run_dir
        self.log_path = os.path.join(run_dir, "logs", "rank0.log")

    def _write(self, event: str, **fields: Any) -> None:
        try:
            ledger.append(self.sweep_dir, self.overrides, event, **fields)
        except OSError as e:  # NOTE: the ledger must never fail a run; sacct still tells the member's fate
            log.warning("could not write the sweep ledger in %s: %s", self.sweep_dir, e)

    def started(self, name: str, total: int) -> None:
        self._write(
            "started",
            index=self.index,
            name=name,
            run_dir=self.run_dir,
            job_id=slurm_job_id(),
            total=total,
            log_path=self.log_path,
            host=os.uname().nodename,
            pid=os.getpid(),
        )

    def configured(self, config_hash: str) -> None:
        self._write("configured", config_hash=config_hash)

    def resumed(self, step: int, config_hash: str) -> None:
        self._write("resumed", step=step, config_hash=config_hash)

    def progress(self, step: int) -> None:
        self._write("progress", step=step)

    def finished(self, objective: float, step: int | None = None) -> None:
        self._write("finished", objective=objective, step=step)

    def requeued(self, reason: str) -> None:
        self._write("requeued", reason=reason)

    def failed(self, error: BaseException) -> None:
        from runner.errors import one_line

        self._write("failed", reason=type(error).__name__, error=one_line(error), log_path=self.log_path)


def current() -> MemberLedger | None:
    """The ledger writer of this process when it is rank 0 of a sweep member, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or _rank() != 0:
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    num = getattr(hc.job, "num", None)
    return MemberLedger(
        os.path.abspath(str(hc.sweep.dir)),
        list(hc.overrides.task),
        int(num) if num is not None else None,
        os.path.abspath(str(hc.runtime.output_dir)),
    )


class ProgressSink:
    """A metric sink that records the latest training step in the ledger (one small append per log call)."""

    def __init__(self, member: MemberLedger) -> None:
        self.member = member

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if prefix == "train":
            self.member.progress(step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
