"""Compose the real config, shrink it, and build every option of every group."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from runner import build
from runner.__main__ import CONFIG_DIR
from runner.config import ConfigError, parse_duration, validate
from runner.naming import run_name, sweep_name
from runner.storage import StorageSettings

GROUPS = {
    "model": ["vit_tiny", "vits16", "vitb16", "vitl16"],
    "opt": ["adamw", "sgd"],
    "sched": ["cosine", "const", "const_cooldown"],
    "data": ["synthetic"],
    "storage": ["local"],
}


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["name=test", *overrides])


def test_every_group_option_is_listed_here() -> None:
    for group, options in GROUPS.items():
        on_disk = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, group)) if f.endswith(".yaml"))
        expected = set(options) | ({"custom"} if group == "model" else set())
        expected |= {"s3"} if group == "storage" else set()
        expected |= {"imagefolder"} if group == "data" else set()
        assert set(on_disk) == expected, group


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_validates_and_builds(group: str, option: str) -> None:
    cfg = compose_cfg(f"{group}={option}", "+debug=tiny")
    validate(cfg)
    if group == "model":
        with torch.device("meta"):  # Large presets: shapes only, no memory.
            model = build.build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) > 0
        return
    parts = build.build(cfg)
    assert parts.schedule(0) > 0
    assert len(parts.data.train) > 0
    assert isinstance(parts.optimizer, torch.optim.Optimizer)
    assert isinstance(build.build_storage(cfg), StorageSettings)


def test_storage_s3_builds_settings_that_open_the_runs_remote_home() -> None:
    cfg = compose_cfg("storage=s3", "storage.url=s3://bucket/runs", "storage.endpoint_url=http://127.0.0.1:9")
    settings = build.build_storage(cfg)
    assert settings.sync_every_s == 300.0 and settings.s3.endpoint_url == "http://127.0.0.1:9"
    remote = settings.remote("r1")
    assert remote is not None and remote.url() == "s3://bucket/runs/r1" and remote.lists_content_keys


def test_vitb16_has_about_86m_parameters() -> None:
    cfg = compose_cfg("model=vitb16", "data.image_size=224", "data.num_classes=1000")
    with torch.device("meta"):
        model = build.build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 85e6 < n < 88e6, n


def test_experiment_preset_composes() -> None:
    cfg = compose_cfg("+experiment=vitb16_adamw", "data.root=/tmp/nowhere", "data.num_classes=100")
    validate(cfg)
    assert cfg.model.width == 768 and cfg.trainer.precision == "bf16"


def test_custom_model_target_accepts_any_module() -> None:
    cfg = compose_cfg("model=custom", "model._target_=torch.nn.Linear", "+model.in_features=4", "+model.out_features=2")
    model = build.build_model(cfg)
    assert isinstance(model, torch.nn.Linear)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("opt.lr=-1", "opt.lr"),
        ("trainer.max_steps=-1", "trainer.max_steps"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.keep_latest_k=0", "trainer.keep_latest_k"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("model.heads=5", "model.width"),
        ("storage.sync_every=soon", "storage.sync_every"),
        ("name=../escape", "name"),
    ],
)
def test_range_errors_name_the_key(override: str, key: str) -> None:
    """Rejected when composed (a choice: the schema's enum) or validated (a range), with the key first."""
    from runner.errors import config_error_message

    with pytest.raises(Exception) as raised:
        validate(compose_cfg(override))
    message = config_error_message(raised.value)
    assert message is not None and message.startswith(key), message


def test_max_steps_zero_is_a_dry_run_that_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.__main__ import train

    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg("+debug=tiny", "trainer.max_steps=0")
    assert math.isnan(train(cfg))
    assert list(tmp_path.iterdir()) == []


def test_durations() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("5m") == 300
    assert parse_duration("1h") == 3600
    assert parse_duration(12) == 12
    with pytest.raises(ConfigError, match=r"storage\.sync_every"):
        parse_duration("5 minutes", "storage.sync_every")


def test_names_are_stable_and_safe() -> None:
    assert run_name("") == "default"
    assert run_name("model=vitb16,opt=adamw") == "model=vitb16,opt=adamw"
    url_name = run_name("+debug=tiny,data.root=s3://b/x")
    assert url_name.startswith("debug=tiny,data.root=s3") and "/" not in url_name and ":" not in url_name
    long = run_name(",".join(f"k{i}=v{i}" for i in range(100)))
    assert len(long) <= 120 and long == run_name(",".join(f"k{i}=v{i}" for i in range(100)))
    assert sweep_name(["opt.lr=1e-3,3e-4", "trainer.max_steps=5"], ["trainer.max_steps"]) == "opt.lr=1e-3,3e-4"
    assert ".." not in run_name("name=../../x")


def test_structured_values_become_a_short_stable_digest_with_their_key() -> None:
    structured = "+model._args_=[{_target_: torch.nn.Flatten}, {_target_: torch.nn.Linear, in_features: 3072}]"
    name = run_name(f"{structured},model=custom")
    assert name == run_name(f"{structured},model=custom")  # stable: the same command names the same run
    key, digest = name.split(",")[0].split("=")
    assert key == "model._args_" and digest.startswith("hash-") and len(digest) == 15, name
    assert name.endswith(",model=custom") and len(name) <= 41
    assert run_name(structured.replace("3072", "1024")) != run_name(structured)
    # Values that fit stay readable, as before: numbers, paths, lists, ranges.
    assert run_name("opt.betas=[0.9,0.95],data.root=/data/x") == "opt.betas=_0.9,0.95_,data.root=_data_x"
    assert sweep_name(["trainer.seed=range(100)"]) == "trainer.seed=range_100"
    assert run_name("data.root=" + "x" * 41).startswith("data.root=hash-")  # too long to read anyway


def test_a_missing_sweeper_plugin_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.errors import MissingConfigException

    from runner import errors

    monkeypatch.setitem(errors._PLUGIN_EXTRAS, "hydra/sweeper=not_installed", "install the extra")
    with pytest.raises(MissingConfigException) as raised:
        compose_cfg("hydra/sweeper=not_installed")
    assert errors.config_error_message(raised.value) == "hydra/sweeper=not_installed: not installed; install the extra"
    assert "runner[sweep]" in errors._PLUGIN_EXTRAS["hydra/sweeper=optuna"]


def test_composed_config_is_typed() -> None:
    cfg = compose_cfg()
    assert OmegaConf.get_type(cfg.trainer).__name__ == "TrainerConfig"
    assert OmegaConf.get_type(cfg.model).__name__ == "ViTConfig"
