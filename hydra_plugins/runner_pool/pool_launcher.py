"""``hydra/launcher=pool``: Hydra's launcher API over :mod:`runner.launch.pool`.

Each member runs ``python -m hydra_plugins.runner_pool.worker <payload>`` in a subprocess: the payload
(cloudpickled, like hydra-submitit-launcher's) carries the Hydra context, the sweep config and the task
function, and the worker runs the member exactly as the basic launcher would, then writes its
``JobReturn`` next to the payload. A member with no result (it crashed) is reported as failed with its
log path; Hydra raises for failed members after the whole batch has run.
"""

# NOTE: no `from __future__ import annotations`: Hydra's plugin scan imports this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations.
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class PoolLauncherConf:
    _target_: str = "hydra_plugins.runner_pool.pool_launcher.PoolLauncher"
    # Device slots in the pool: null = every visible GPU, or every CPU this process may use.
    slots: int | None = None
    # Slots given to each member (GPUs per member on a GPU machine, cores per member on CPU).
    slots_per_member: int = 1
    # Members running at once; null = slots // slots_per_member.
    max_parallel: int | None = None
    # auto (GPUs when visible, else CPUs), cuda or cpu.
    device: str = "auto"


ConfigStore.instance().store(group="hydra/launcher", name="runner_pool", node=PoolLauncherConf, provider="runner")


class PoolLauncher(Launcher):
    def __init__(self, slots: int | None, slots_per_member: int, max_parallel: int | None, device: str) -> None:
        self.slots, self.slots_per_member, self.max_parallel, self.device = (
            slots,
            slots_per_member,
            max_parallel,
            device,
        )
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle

        from runner.launch.pool import Member, detect_devices, plan, run_pool
        from runner.sweep import ledger

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        devices = detect_devices(self.device)
        total, parallel = plan(devices, self.slots, self.slots_per_member, self.max_parallel)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        pool_dir = sweep_dir / ".pool"
        pool_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "pool: %d members on %d %s slots, %d per member, %d at once; logs in %s",
            len(job_overrides),
            total,
            devices.kind,
            self.slots_per_member,
            parallel,
            pool_dir,
        )
        members = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            payload = pool_dir / f"{idx}.payload.pkl"
            result = pool_dir / f"{idx}.result.pkl"
            result.unlink(missing_ok=True)
            with open(payload, "wb") as f:
                cloudpickle.dump(
                    {
                        "hydra_context": self.hydra_context,
                        "config": self.config,
                        "task_function": self.task_function,
                        "overrides": list(overrides),
                        "idx": idx,
                        "singleton_state": Singleton.get_state(),
                    },
                    f,
                )
            label = " ".join(filter_overrides(overrides))
            log.info("\t#%d : %s", idx, label)
            ledger.append(
                str(sweep_dir), list(overrides), "submitted", index=idx, log_path=str(pool_dir / f"{idx}.log")
            )
            command = [sys.executable, "-m", "hydra_plugins.runner_pool.worker", str(payload), str(result)]
            members.append(Member(idx, command, str(pool_dir / f"{idx}.log"), label=label))

        done = run_pool(members, devices, total, self.slots_per_member, parallel, str(pool_dir / "events.jsonl"))
        return [
            self._result(m.index, m.returncode, m.log_path, list(o)) for m, o in zip(done, job_overrides, strict=True)
        ]

    def _result(self, idx: int, code: int | None, log_path: str, overrides: list[str]) -> JobReturn:
        import cloudpickle

        assert self.config is not None
        path = Path(str(self.config.hydra.sweep.dir)).absolute() / ".pool" / f"{idx}.result.pkl"
        from runner.errors import MemberConfigError, MemberFailed

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
        else:  # killed, or crashed before Hydra could report: the member could not write its ledger event
            error = MemberFailed(f"{label} exited with code {code} (log: {log_path})")
            from runner.sweep import ledger

            sweep_dir = str(Path(str(self.config.hydra.sweep.dir)).absolute())
            reason = f"exit code {code}"
            ledger.append(sweep_dir, overrides, "failed", reason=reason, error=reason, log_path=log_path)
        return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error)
