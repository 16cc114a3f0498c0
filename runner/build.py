"""The only module that calls ``hydra.utils.instantiate``: config sections in, runtime objects out.

Keeping every call site here means an allow-list of ``_target_`` prefixes (coming in Hydra 1.4) is a
one-line change, and one test can build every option of every group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from runner.config import TARGET_SECTIONS, ConfigError
from runner.storage import StorageSettings
from runner.train.data import Splits
from runner.train.optim import Schedule, param_groups


@dataclass
class Parts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    data: Splits


def check_targets(cfg: DictConfig) -> None:
    """Import every ``_target_`` before the run writes anything: a module or name that does not import is
    one line naming the key and the missing piece (:class:`ConfigError`), not a traceback from inside
    ``instantiate`` after the run directory was made."""
    from hydra._internal.utils import _locate

    for section in TARGET_SECTIONS:
        target = cfg[section].get("_target_")
        if not isinstance(target, str):
            continue
        try:
            _locate(target)
        except ImportError as e:
            cause = e.__cause__ or e.__context__
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
            raise ConfigError(
                f"{section}._target_={target}: cannot import it ({detail}); install what it needs or point "
                f"{section}._target_ at an importable class"
            ) from None


def build_storage(cfg: DictConfig) -> StorageSettings:
    """The run's storage settings: built once per run (the run's parts are rebuilt after a bad checkpoint)."""
    settings = instantiate(cfg.storage)
    if not isinstance(settings, StorageSettings):
        raise TypeError(f"storage._target_ must build a runner.storage.StorageSettings, got {type(settings).__name__}")
    return settings


def build_data(cfg: DictConfig) -> Splits:
    return instantiate(cfg.data, seed=cfg.trainer.seed)


def build_model(cfg: DictConfig) -> nn.Module:
    model = instantiate(cfg.model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model._target_={cfg.model._target_} built a {type(model).__name__}, not an nn.Module")
    return model


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    make: Callable[[Any], torch.optim.Optimizer] = instantiate(cfg.opt)
    return make(param_groups(model, float(cfg.opt.weight_decay)))


def build_schedule(cfg: DictConfig) -> Schedule:
    return instantiate(cfg.sched, base_lr=float(cfg.opt.lr), total_steps=int(cfg.trainer.max_steps))


def build(
    cfg: DictConfig, device: torch.device | None = None, prepare: Callable[[nn.Module], nn.Module] = lambda m: m
) -> Parts:
    """Build the training parts; the caller seeds torch first so model initialisation is reproducible.
    (Storage is built once per run, by :func:`build_storage`: it is not rebuilt when a corrupt checkpoint
    makes the run build its parts again.)"""
    data = build_data(cfg)
    # NOTE: prepare (activation checkpointing, FSDP's sharding) before the optimizer is built over the
    # parameters: sharding replaces them.
    model = prepare(build_model(cfg).to(device or torch.device("cpu")))
    return Parts(
        model=model,
        optimizer=build_optimizer(cfg, model),
        schedule=build_schedule(cfg),
        data=data,
    )
