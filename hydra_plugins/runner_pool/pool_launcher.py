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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
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
        from runner.launch.payload import read_result, record_death, write_member
        from runner.launch.pool import Pool, PoolSettings, detect_devices, plan
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
            member = write_member(
                pool_dir, initial_job_idx + offset, overrides, self.hydra_context, self.config, self.task_function
            )
            ledger.append(str(sweep_dir), list(overrides), "submitted", index=member.index, log_path=member.log_path)
            members.append(member)

        by_index = {m.index: list(o) for m, o in zip(members, job_overrides, strict=True)}
        settings = PoolSettings(devices, total, self.slots_per_member, parallel, str(pool_dir / "events.jsonl"))
        done = Pool(settings).run(
            members, on_end=lambda m: record_death(str(sweep_dir), pool_dir, m, by_index[m.index])
        )
        return [
            read_result(str(sweep_dir), pool_dir, m.index, m.returncode, m.log_path, list(o))
            for m, o in zip(done, job_overrides, strict=True)
        ]
