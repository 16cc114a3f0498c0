"""One pool member: ``python -m hydra_plugins.runner_pool.worker <payload.pkl> <result.pkl>``.

Runs the member as Hydra's basic launcher would (same sweep config, same run directory) and writes its
``JobReturn``. A failed member's exception is stored as its one-line reason (see ``PoolLauncher._result``),
so an unpicklable exception cannot turn a failure into a crash of the parent.
"""

from __future__ import annotations

import os
import sys

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, run_job, setup_globals
from omegaconf import open_dict

from runner.errors import config_error_message, one_line
from runner.launch.pool import apply_cpu_pinning
from runner.launch.requeue import catch_early


def main(payload_path: str, result_path: str) -> int:
    catch_early()
    apply_cpu_pinning()
    with open(payload_path, "rb") as f:
        payload = cloudpickle.load(f)
    Singleton.set_state(payload["singleton_state"])
    setup_globals()
    context = payload["hydra_context"]
    sweep_config = context.config_loader.load_sweep_config(payload["config"], payload["overrides"])
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = payload["idx"]
        sweep_config.hydra.job.num = payload["idx"]
    ret = run_job(
        hydra_context=context,
        task_function=payload["task_function"],
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    if ret.status == JobStatus.FAILED:
        # NOTE: the reason in one line, and whether it is a configuration error (exit 2), rather than the
        # exception itself: it may not unpickle in the parent, and its traceback is in the member's log.
        error = ret._return_value
        ret._return_value = {"reason": one_line(error), "config_error": config_error_message(error) is not None}
    tmp = f"{result_path}.tmp"
    with open(tmp, "wb") as f:
        cloudpickle.dump(ret, f)
    os.replace(tmp, result_path)
    return 0 if ret.status == JobStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
