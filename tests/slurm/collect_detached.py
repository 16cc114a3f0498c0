"""Hydra's LauncherTestSuite for a detached launch (``hydra/launcher=runner_slurm hydra.launcher.wait=false``).

The suite runs sweeps in-process and inspects what the launcher returns: each member's config, directory and
return value. A detached launch returns placeholders at once and never waits for the members, by design. So
the test wraps the launcher Hydra builds in :class:`ThenCollect`: the detached launch runs unchanged, its
placeholders are checked (they prove it did not wait), then the members' real results are read back from what
the launch left behind, the sweep ledger and submitit's folders, as anyone following the sweep after the
command has exited would find them. (IntegrationTestSuite runs each command in its own process; that one is
wrapped in tests/slurm/wait_detached.py.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from runner.sweep import ledger

if TYPE_CHECKING:
    from hydra_plugins.runner_slurm.slurm_launcher import RunnerSlurmLauncher


def member_results(sweep_dir: str, job_overrides: Sequence[Sequence[str]], timeout_s: float = 240) -> list[JobReturn]:
    """Each member's ``JobReturn``, once its job has ended: the job id and submitit folder from the member's
    ledger record, the result from the file the job wrote (submitit raises if the job failed or died)."""
    import submitit

    records = {r.key: r for r in ledger.read(sweep_dir)}
    jobs: list[submitit.SlurmJob[JobReturn]] = []
    for overrides in job_overrides:
        record = records.get(ledger.member_key(list(overrides)))
        assert record is not None and record.job_id and record.log_path, f"no ledger record of {overrides}"
        jobs.append(submitit.SlurmJob(Path(record.log_path).parent, record.job_id))
    # NOTE: submitit's own wait looks for the result file once a second, one job after the other.
    deadline = time.monotonic() + timeout_s
    while not all(job.done() for job in jobs):
        assert time.monotonic() < deadline, f"jobs {[(j.job_id, j.state) for j in jobs]} did not end in {timeout_s}s"
        time.sleep(0.1)
    return [job.results()[0] for job in jobs]  # rank 0's, as the blocking launch returns


class ThenCollect(Launcher):
    """A detached launcher's ``launch``, then its members' results (:func:`member_results`)."""

    def __init__(self, launcher: RunnerSlurmLauncher) -> None:
        assert launcher.wait is False, "ThenCollect wraps detached launches: hydra.launcher.wait=false"
        self.launcher = launcher

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        raise AssertionError("ThenCollect wraps a launcher Hydra has already set up")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        submitted = self.launcher.launch(job_overrides, initial_job_idx)
        assert list(submitted) == [JobReturn(overrides=list(o), status=JobStatus.COMPLETED) for o in job_overrides]
        assert self.launcher.config is not None
        return member_results(str(Path(str(self.launcher.config.hydra.sweep.dir)).absolute()), job_overrides)


def then_collect(instantiate: Callable[..., Launcher]) -> Callable[..., Launcher]:
    """``Plugins.instantiate_launcher``, its launcher wrapped in :class:`ThenCollect`. The members' jobs get the
    launcher itself (submitit pickles the object whose ``__call__`` runs them), never the wrapper."""

    def instantiate_then_collect(plugins: Any, **kwargs: Any) -> Launcher:
        launcher: RunnerSlurmLauncher = instantiate(plugins, **kwargs)  # type: ignore[assignment]
        return ThenCollect(launcher)

    return instantiate_then_collect
