"""Launcher presets compose with the values the issue asks for."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from runner.__main__ import CONFIG_DIR
from runner.launch.pool import Devices, PoolConfigError, pin_env, plan


def _hydra(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra


def test_slurm_ties_tasks_to_gpus_and_allows_requeues() -> None:
    gpu = _hydra(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8"]).launcher
    assert gpu.tasks_per_node == 8
    cpu = _hydra(["hydra/launcher=slurm"]).launcher
    assert cpu.tasks_per_node == 1 and cpu.gpus_per_node is None
    assert cpu.max_num_timeout >= 1 and cpu.signal_delay_s > 0 and cpu.timeout_min > 0
    assert cpu.partition is None and cpu.account is None
    assert cpu._target_.endswith("SlurmLauncher")
    assert _hydra(["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2"]).launcher.tasks_per_node == 2


def test_local_and_pool_presets_compose() -> None:
    assert _hydra(["hydra/launcher=local"]).launcher._target_.endswith("LocalLauncher")
    pool = _hydra(["hydra/launcher=pool"]).launcher
    assert pool._target_ == "hydra_plugins.runner_pool.pool_launcher.PoolLauncher"
    assert pool.slots_per_member == 1 and pool.slots is None and pool.max_parallel is None


def test_pool_plan_and_pinning() -> None:
    cpus = Devices("cpu", (0, 1, 2, 3))
    assert plan(cpus, None, 1, None) == (4, 4)
    assert plan(cpus, 4, 2, None) == (4, 2)
    assert plan(cpus, 4, 1, 3) == (4, 3)
    assert pin_env(cpus, [2, 3]) == {"RUNNER_POOL_CPUS": "2,3", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    assert pin_env(Devices("cuda", (4, 5, 6)), [1, 2]) == {"CUDA_VISIBLE_DEVICES": "5,6"}
    with pytest.raises(PoolConfigError, match="slots_per_member=3"):
        plan(Devices("cpu", (0, 1)), 2, 3, None)
    with pytest.raises(PoolConfigError, match="only 2 GPUs"):
        plan(Devices("cuda", (0, 1)), 4, 1, None)


@pytest.mark.parametrize("launcher", ["slurm", "slurm_packed"])
def test_a_signal_delay_as_long_as_the_time_limit_is_refused(launcher: str) -> None:
    """SLURM would send the save-and-requeue signal as each job starts (and at every requeue)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from runner.config import ConfigError

    params = OmegaConf.to_container(_hydra([f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=2"]).launcher)
    assert isinstance(params, dict)
    cls = get_class(str(params.pop("_target_")))
    with pytest.raises(ConfigError, match=r"signal_delay_s=120 is not shorter than hydra.launcher.timeout_min=2"):
        cls(**params)
    assert cls(**{**params, "signal_delay_s": 30}).params["timeout_min"] == 2
