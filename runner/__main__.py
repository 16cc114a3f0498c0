"""``python -m runner [group=option ...] [key=value ...]``: compose the config, run, return the objective."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from runner.config import limit_yaml_aliases, register_configs
from runner.errors import config_error_message, run_error_message

log = logging.getLogger("runner")

_HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = next(p for p in (os.path.join(_HERE, "conf"), os.path.join(_HERE, "..", "conf")) if os.path.isdir(p))


def _run_name(override_dirname: str) -> str:
    from runner.naming import run_name

    return run_name(override_dirname)


def _sweep_name(task_overrides: list[str], exclude_keys: list[str]) -> str:
    from runner.naming import sweep_name

    return sweep_name(list(task_overrides), list(exclude_keys))


def _checked_name(name: str) -> str:
    from runner.config import check_name

    return check_name(str(name))


def _tasks_per_node(gpus_per_node: int | None) -> int:
    """One rank per GPU (conf/hydra/launcher/slurm.yaml); a CPU-only job runs one task unless told."""
    return int(gpus_per_node) if gpus_per_node else 1


OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
OmegaConf.register_new_resolver("checked_name", _checked_name, replace=True)
OmegaConf.register_new_resolver("runner_tasks_per_node", _tasks_per_node, replace=True)
OmegaConf.register_new_resolver("sweep_name", _sweep_name, replace=True, use_cache=True)
register_configs()
limit_yaml_aliases()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """The task function, of one run or of each sweep member. A run's error becomes one line and an exit code
    here (Hydra would print its own report first); a member's is raised, for its launcher to report."""
    try:
        _validate_before_torch(cfg)
        if cfg.trainer.max_steps == 0:
            return _dry_run(cfg)
        from runner.run import run

        return run(cfg)
    except Exception as e:
        if not _is_sweep_member():
            _exit_if_config_error(e)
        raise


def _is_sweep_member() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _validate_before_torch(cfg: DictConfig) -> None:
    """Reject a bad config before ``runner.run`` imports torch: a typo costs ~1 s instead of ~4 s.

    ``run`` validates again (it is also called directly, without this entry point); that is cheap.
    """
    from hydra.core.hydra_config import HydraConfig

    from runner.config import validate
    from runner.naming import remove_if_empty

    try:
        validate(cfg)
    except Exception as e:
        if config_error_message(e) is not None and HydraConfig.initialized():
            remove_if_empty(HydraConfig.get().runtime.output_dir, os.getcwd())
        raise


def _dry_run(cfg: DictConfig) -> float:
    """``trainer.max_steps=0``: the config is valid and there is nothing to train, so stop before torch is
    imported and undo Hydra's mkdir of the run directory (``run`` does the same when called directly)."""
    from hydra.core.hydra_config import HydraConfig

    from runner.naming import remove_if_empty

    if HydraConfig.initialized():
        remove_if_empty(HydraConfig.get().runtime.output_dir, os.getcwd())
    log.info("run %r: config valid; trainer.max_steps=0 (dry run), so nothing to train", str(cfg.name))
    return float("nan")


def _exit_if_config_error(error: Exception) -> None:
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
        _exit_if_config_error(e)
        raise


if __name__ == "__main__":
    cli()
