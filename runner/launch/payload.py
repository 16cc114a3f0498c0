"""Pool members as payloads: what ``python -m hydra_plugins.runner_pool.worker`` needs to run one member as
Hydra's basic launcher would (cloudpickled, like hydra-submitit-launcher's), and the ``JobReturn`` it leaves.

Shared by ``hydra/launcher=pool`` and ``hydra/launcher=slurm_packed`` (which runs the pool inside a job).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from runner.launch.pool import Member

log = logging.getLogger(__name__)


def write_member(
    folder: Path,
    idx: int,
    overrides: Sequence[str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
) -> Member:
    """The member's payload (what the worker needs to run it as Hydra would) and its pool entry."""
    import cloudpickle

    payload, result = folder / f"{idx}.payload.pkl", folder / f"{idx}.result.pkl"
    result.unlink(missing_ok=True)
    with open(payload, "wb") as f:
        cloudpickle.dump(
            {
                "hydra_context": hydra_context,
                "config": config,
                "task_function": task_function,
                "overrides": list(overrides),
                "idx": idx,
                "singleton_state": Singleton.get_state(),
            },
            f,
        )
    label = " ".join(filter_overrides(overrides))
    log.info("\t#%d : %s", idx, label)
    command = [sys.executable, "-m", "hydra_plugins.runner_pool.worker", str(payload), str(result)]
    return Member(idx, command, str(folder / f"{idx}.log"), label=label)


def read_result(
    sweep_dir: str, folder: Path, idx: int, code: int | None, log_path: str, overrides: list[str]
) -> JobReturn:
    """The member's ``JobReturn`` as its worker wrote it; a failure becomes one line naming it and its log."""
    import cloudpickle

    from runner.errors import MemberConfigError, MemberFailed

    path = folder / f"{idx}.result.pkl"
    label = f"sweep member #{idx} ({' '.join(overrides)})"
    ret: JobReturn | None = None
    if path.exists():
        with open(path, "rb") as f:
            ret = cloudpickle.load(f)
    if ret is not None and ret.status != JobStatus.FAILED:
        return ret
    if ret is not None:
        failure = dict(ret._return_value)
        kind = MemberConfigError if failure["config_error"] else MemberFailed
        error: Exception = kind(f"{label} failed: {failure['reason']} (log: {log_path})")
    else:  # killed, or crashed before Hydra could report (see record_death)
        error = MemberFailed(f"{label} exited with code {code} (log: {log_path})")
    return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error)


def record_death(sweep_dir: str, folder: Path, member: Member, overrides: list[str]) -> None:
    """As soon as a member process ends without a result (killed, or crashed before Hydra could report), say
    so in its ledger record: it could not, and ``status`` must not show it running until the sweep ends."""
    if member.returncode in (0, None) or (folder / f"{member.index}.result.pkl").exists():
        return
    from runner.sweep import ledger

    reason = f"exit code {member.returncode}"
    ledger.append(sweep_dir, overrides, "failed", reason=reason, error=reason, log_path=member.log_path)
