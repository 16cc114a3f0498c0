from __future__ import annotations

import math

import pytest
import torch

from runner.models.vit import VisionTransformer
from runner.train.optim import ConstCooldownSchedule, ConstSchedule, CosineSchedule, param_groups


def test_warmup_is_linear_then_cosine_decays_to_floor() -> None:
    s = CosineSchedule(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.5 * 0.9)
    assert s(110) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_const_and_cooldown() -> None:
    assert ConstSchedule(base_lr=0.5, total_steps=10, warmup_steps=0)(7) == 0.5
    s = ConstCooldownSchedule(base_lr=1.0, total_steps=100, warmup_steps=0, cooldown_steps=20, cooldown_end_ratio=0.0)
    assert s(79) == 1.0
    assert s(90) == pytest.approx(0.5)
    assert s(100) == pytest.approx(0.0)


def test_schedules_are_pure_functions_of_step() -> None:
    s = CosineSchedule(base_lr=3e-4, total_steps=1000, warmup_steps=100)
    first = [s(i) for i in range(1000)]
    assert first == [s(i) for i in range(1000)]
    assert all(math.isfinite(v) and v > 0 for v in first[:-1])


def test_no_weight_decay_on_biases_norms_and_scalars() -> None:
    model = VisionTransformer(image_size=16, patch_size=8, num_classes=3, width=16, depth=1, heads=2)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    torch.optim.AdamW([decay, no_decay], lr=1e-3)
