"""``python -m runner [group=option ...] [key=value ...]``: compose -> validate once -> run -> exit code.

:func:`train` is the whole job for one composed config (what tests call); :func:`main` is the Hydra task
function (one run, or each member of a sweep) and returns the objective, so Hydra's sweepers can optimise it;
:func:`cli` installs what composing needs, then turns a failure into one line and an exit code (2: fix the
config, 1: the run failed in a way the message explains).
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from runner.config import install
from runner.errors import config_error_message, run_error_message

log = logging.getLogger("runner")

_HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = next(p for p in (os.path.join(_HERE, "conf"), os.path.join(_HERE, "..", "conf")) if os.path.isdir(p))


def train(cfg: DictConfig) -> float:
    """Validate ``cfg`` once (before torch is imported: a typo costs ~1 s, not ~4 s), then run it.

    A rejected config undoes Hydra's mkdir of the run directory. ``trainer.max_steps=0`` is a dry run: the
    config is valid and nothing is built or written.
    """
    from hydra.core.hydra_config import HydraConfig

    from runner.config import validate
    from runner.naming import remove_if_empty

    run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    try:
        validate(cfg)
    except Exception as e:
        if config_error_message(e) is not None and run_dir is not None:
            remove_if_empty(run_dir, os.getcwd())
        raise
    if cfg.trainer.max_steps == 0:
        if run_dir is not None:
            remove_if_empty(run_dir, os.getcwd())
        log.info("run %r: config valid; trainer.max_steps=0 (dry run), so nothing to train", str(cfg.name))
        return float("nan")
    from runner.run import run

    return run(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """The task function, of one run or of each sweep member. A run's error becomes one line and an exit code
    here (Hydra would print its own report first); a member's is raised, for its launcher to report."""
    from runner.sweep.member import current

    member = current()  # rank 0 of a sweep member writes its own ledger events
    if member is not None:
        member.started(str(cfg.name), int(cfg.trainer.max_steps))
    try:
        objective = train(cfg)
    except Exception as e:
        if member is not None:
            log.error("sweep member failed: %s", e, exc_info=True)  # the traceback, in the member's own log
            member.failed(e)
        if not _is_sweep_member():
            _exit_if_known(e)
        raise
    except SystemExit:  # the requeue on a preemption or time-out signal ends the process this way
        if member is not None:
            member.requeued("requeued by SLURM (preemption or time limit)")
        raise
    if member is not None:
        member.finished(objective)
    return objective


def _is_sweep_member() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _exit_if_known(error: Exception) -> None:
    """One line and exit 2 for a config error, 1 for a run error the message explains; else return."""
    message = config_error_message(error)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        # NOTE: SystemExit is not an Exception, so Hydra does not wrap it in its own multi-line report.
        raise SystemExit(2) from None
    message = run_error_message(error)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def cli() -> None:
    install()
    # NOTE: Hydra then re-raises errors instead of printing them and exiting 1; we report config
    # errors as one line with exit code 2, and let anything else surface with its traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        from runner.help import render

        print(render(CONFIG_DIR, [a for a in sys.argv[1:] if not a.startswith("-")]), end="")
        return
    try:
        main()
    except Exception as e:
        _exit_if_known(e)
        raise


if __name__ == "__main__":
    cli()
