"""Parameter groups and learning-rate schedules.

Schedules are pure functions of the step (open_clip's ``scheduler.py`` semantics): the LR at step
``s`` depends on nothing else, so a resumed run needs no scheduler state beyond the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights only: biases, norms, embeddings' scalars (ndim < 2) get none."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _warmup(base_lr: float, warmup_steps: int, step: int) -> float:
    return base_lr * (step + 1) / warmup_steps


@dataclass(frozen=True)
class Schedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(self.base_lr, self.warmup_steps, step)
        return self.after_warmup(step)

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class ConstSchedule(Schedule):
    def after_warmup(self, step: int) -> float:
        return self.base_lr


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    min_lr_ratio: float = 0.0

    def after_warmup(self, step: int) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.base_lr * self.min_lr_ratio
        return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (self.base_lr - floor)


@dataclass(frozen=True)
class ConstCooldownSchedule(Schedule):
    cooldown_steps: int = 100
    cooldown_power: float = 1.0
    cooldown_end_ratio: float = 0.0

    def after_warmup(self, step: int) -> float:
        start = self.total_steps - self.cooldown_steps
        if step < start:
            return self.base_lr
        progress = min(1.0, (step - start) / self.cooldown_steps)
        end = self.base_lr * self.cooldown_end_ratio
        return end + (self.base_lr - end) * (1 - progress) ** self.cooldown_power
