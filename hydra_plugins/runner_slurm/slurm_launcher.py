"""hydra-submitit-launcher's ``SlurmLauncher``, extended: every member gets a ``submitted`` record in the sweep
ledger (with its SLURM job id and log), and ``hydra.launcher.wait=false`` returns as soon as the job array is
submitted instead of blocking on the login node until the last member ends.

Members run exactly as upstream's do (``__call__`` and ``checkpoint`` are inherited: requeues resubmit the same
Hydra job into the same directory); only ``launch`` is rewritten.

``PackedSlurmLauncher`` (``hydra/launcher=slurm_packed``, below) runs several members per job.
"""

# NOTE: no `from __future__ import annotations`: Hydra's plugin scan imports this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations.
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class RunnerSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.runner_slurm.slurm_launcher.RunnerSlurmLauncher"
    # true: block until every member ends (Hydra's behaviour). false: submit the job array, write the ledger,
    # print the sweep directory and the `python -m runner.sweep status` command, and exit 0 at once.
    wait: bool = True


ConfigStore.instance().store(group="hydra/launcher", name="runner_slurm", node=RunnerSlurmQueueConf, provider="runner")


class RunnerSlurmLauncher(SlurmLauncher):
    def __init__(self, wait: bool = True, **params: Any) -> None:
        super().__init__(**params)  # NOTE: without `wait`: upstream passes every param on to the executor
        self.wait = bool(wait)
        from runner.config import ConfigError

        delay, limit = params.get("signal_delay_s"), params.get("timeout_min")
        if delay is not None and limit is not None and delay >= 60 * limit:
            # NOTE: SLURM would send the save-and-requeue signal as the job starts, and again at every requeue.
            raise ConfigError(
                f"hydra.launcher.signal_delay_s={delay} is not shorter than hydra.launcher.timeout_min={limit} "
                f"({60 * limit} s): the preemption signal would arrive as each job starts; lower "
                "hydra.launcher.signal_delay_s or raise hydra.launcher.timeout_min"
            )

    def _executor(self, **overrides: Any) -> Any:
        """Upstream's executor, from the launcher's parameters (``overrides`` replace some of them)."""
        import submitit

        params = {**self.params, **overrides}
        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": params["max_num_timeout"]},
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k not in init_keys}
        )
        return executor

    def _sweep_dir(self) -> Path:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        return sweep_dir

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # NOTE: upstream's launch builds the executor, submits and blocks on the results in one method, with no
        # seam for the job ids between submitting and waiting; this is its body with that seam added.
        from runner.sweep import ledger

        assert len(job_overrides) > 0
        sweep_dir = self._sweep_dir()
        job_params: list[Any] = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = self._executor().map_array(self, *zip(*job_params, strict=True))
        for offset, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True)):
            ledger.append(
                str(sweep_dir),
                list(overrides),
                "submitted",
                index=initial_job_idx + offset,
                job_id=str(job.job_id),
                log_path=str(job.paths.stdout),
            )
        if self.wait:
            return [j.results()[0] for j in jobs]
        return self._detached(sweep_dir, jobs, job_overrides, f"{len(jobs)} member(s)")

    def _detached(self, sweep_dir: Path, jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]], what: str) -> Any:
        array = str(jobs[0].job_id).split("_")[0]
        print(
            f"submitted {what} (SLURM job array {array}) without waiting; sweep directory:\n"
            f"  {sweep_dir}\nfollow it with:\n  python -m runner.sweep status --watch '{sweep_dir}'",
            flush=True,
        )
        # NOTE: COMPLETED with no value means "submitted" here: Hydra has no such status, and its BasicSweeper reads
        # every result's return_value, which asserts on UNKNOWN (found by Hydra's IntegrationTestSuite). A sweeper
        # that optimises returned values (optuna) needs wait=true.
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=None) for o in job_overrides]


# ----------------------------------------------------------------------------- hydra/launcher=slurm_packed
# ``hydra/launcher=slurm_packed``: K small members inside one SLURM allocation of G device slots.
#
# A sweep of 32 one-GPU members on 8-GPU nodes becomes 4 jobs, not 32. Each job (one element of a job array) runs
# its members through the local device pool (:mod:`runner.launch.pool`), each member pinned to its own slots,
# as ``hydra/launcher=pool`` runs them on a workstation, with the same worker and payloads.
#
# Preemption, per member: a member that gets the requeue signal (USR2) saves, exits with a "run me again"
# code, and the pack runs it again at once; it resumes from that checkpoint. Per job: when SLURM signals the
# whole job, the pack asks every running member to save and exit, then requeues itself through submitit;
# the requeued pack runs its members again, each resuming from its own checkpoint (finished ones say so and
# end). Every member keeps its own ledger record (with the pack's job id).

#: A packed member's exit code after it saved on the requeue signal (EX_TEMPFAIL): run it again.
REQUEUE_EXIT = 75


@dataclass
class PackedSlurmQueueConf(RunnerSlurmQueueConf):
    _target_: str = "hydra_plugins.runner_slurm.slurm_launcher.PackedSlurmLauncher"
    # Device slots per job: GPUs per job when gpus_per_node is set, else CPU cores (cpus_per_task).
    slots_per_job: int = 8
    # Slots each member gets (GPUs, or cores on CPU). Members are single-process.
    slots_per_member: int = 1
    # Members per job; null = slots_per_job // slots_per_member (all at once). More queue inside the job.
    members_per_job: int | None = None


ConfigStore.instance().store(
    group="hydra/launcher", name="runner_slurm_packed", node=PackedSlurmQueueConf, provider="runner"
)


class PackedSlurmLauncher(RunnerSlurmLauncher):
    def __init__(
        self, slots_per_job: int = 8, slots_per_member: int = 1, members_per_job: int | None = None, **params: Any
    ) -> None:
        super().__init__(**params)
        from runner.config import ConfigError

        if slots_per_job < 1 or not 1 <= slots_per_member <= slots_per_job:
            raise ConfigError(
                f"hydra.launcher.slots_per_member={slots_per_member} must be between 1 and "
                f"hydra.launcher.slots_per_job={slots_per_job}"
            )
        if members_per_job is not None and members_per_job < 1:
            raise ConfigError(f"hydra.launcher.members_per_job={members_per_job}: must be >= 1 (or null)")
        self.slots_per_job, self.slots_per_member = slots_per_job, slots_per_member
        self.members_per_job = members_per_job or slots_per_job // slots_per_member

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from runner.launch.payload import write_member
        from runner.sweep import ledger

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        sweep_dir = self._sweep_dir()
        folder = sweep_dir / ".packed"
        folder.mkdir(parents=True, exist_ok=True)
        members = [
            write_member(folder, initial_job_idx + i, o, self.hydra_context, self.config, self.task_function)
            for i, o in enumerate(job_overrides)
        ]
        k = self.members_per_job
        packs = [(members[i : i + k], [list(o) for o in job_overrides[i : i + k]]) for i in range(0, len(members), k)]
        gpus = self.params.get("gpus_per_node")
        resources = {"tasks_per_node": 1, "nodes": 1}
        resources.update({"gpus_per_node": self.slots_per_job} if gpus else {"cpus_per_task": self.slots_per_job})
        log.info(
            "slurm_packed: %d members in %d job(s) of %d %s slots, %d per member, up to %d members per job",
            len(members),
            len(packs),
            self.slots_per_job,
            "GPU" if gpus else "CPU",
            self.slots_per_member,
            k,
        )
        pack = Pack(str(sweep_dir), str(folder), self.slots_per_job, self.slots_per_member, "cuda" if gpus else "cpu")
        jobs = self._executor(**resources).map_array(pack, *zip(*packs, strict=True))
        for job, (pack_members, pack_overrides) in zip(jobs, packs, strict=True):
            for member, overrides in zip(pack_members, pack_overrides, strict=True):
                ledger.append(
                    str(sweep_dir),
                    overrides,
                    "submitted",
                    index=member.index,
                    job_id=str(job.job_id),
                    log_path=member.log_path,
                )
        if self.wait:
            return [ret for job in jobs for ret in job.results()[0]]
        return self._detached(sweep_dir, jobs, job_overrides, f"{len(members)} member(s) in {len(jobs)} job(s)")


class Pack:
    """What one packed job runs: its members through the device pool, then their results."""

    def __init__(self, sweep_dir: str, folder: str, slots: int, slots_per_member: int, device: str) -> None:
        self.sweep_dir, self.folder = sweep_dir, folder
        self.slots, self.slots_per_member, self.device = slots, slots_per_member, device

    def __call__(self, members: list[Any], overrides: list[list[str]]) -> list[JobReturn]:
        import submitit

        from runner.launch.payload import read_result, record_death
        from runner.launch.pool import Pool, PoolSettings, detect_devices, plan
        from runner.launch.requeue import REQUEUE_EXIT_ENV

        signum = submitit.JobEnvironment._usr_sig()
        original = signal.getsignal(signum)
        received: list[int] = []
        # NOTE: submitit's handler would requeue at once, killing members mid-step: the pack first has them save.
        signal.signal(signum, lambda s, _f: received.append(s))
        devices = detect_devices(self.device)
        total, parallel = plan(devices, self.slots, self.slots_per_member, None)
        folder = Path(self.folder)
        events = str(folder / f"pack{members[0].index}.events.jsonl")
        by_index = {m.index: o for m, o in zip(members, overrides, strict=True)}
        settings = PoolSettings(
            devices,
            total,
            self.slots_per_member,
            parallel,
            events,
            env={REQUEUE_EXIT_ENV: str(REQUEUE_EXIT)},
            # NOTE: a member is a single process of its own, not a task of this job (see distributed.detect).
            drop_env=("SUBMITIT_FOLDER",),
            requeue_code=REQUEUE_EXIT,
            stop_signal=signum,
        )
        done = Pool(settings).run(
            members,
            stop=lambda: bool(received),
            on_end=lambda m: record_death(self.sweep_dir, folder, m, by_index[m.index]),
        )
        if received and callable(original):
            log.warning("pack: every running member saved; requeueing the job")
            original(signum, None)  # submitit: checkpoint() below, scontrol requeue, exit
        return [
            read_result(self.sweep_dir, folder, m.index, m.returncode, m.log_path, o)
            for m, o in zip(done, overrides, strict=True)
        ]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeued as it was submitted: the same members, each resuming from its own checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
