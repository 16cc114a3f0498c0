"""How the model is spread over ranks: ``parallel=ddp`` (replicated weights, all-reduced gradients) or
``parallel=fsdp`` (FSDP2: parameters, gradients and optimizer state sharded), plus activation checkpointing.

:func:`prepare` runs on the freshly built model, before the optimizer is built over its parameters (FSDP
replaces them with sharded ``DTensor``\\ s); :func:`wrap` gives what the loop calls forward on.
"""

from __future__ import annotations

import torch
from torch import nn

from runner import distributed
from runner.config import ParallelConfig
from runner.parallel.blocks import checkpoint_blocks, find_blocks


def prepare(model: nn.Module, cfg: ParallelConfig, activation_checkpointing: bool, device: torch.device) -> nn.Module:
    """Activation checkpointing on each block (if asked), then FSDP's sharding (``parallel=fsdp``)."""
    blocks = find_blocks(model, list(cfg.blocks)) if activation_checkpointing or cfg.kind == "fsdp" else []
    if activation_checkpointing:
        blocks = checkpoint_blocks(model, blocks)
    if cfg.kind == "fsdp":
        from runner.parallel.fsdp import shard

        shard(model, blocks, cfg, device)
    return model


def wrap(model: nn.Module, cfg: ParallelConfig, device: torch.device, compile_model: bool) -> nn.Module:
    """What the loop calls forward on: compiled if asked, DDP-wrapped with several ranks under ``ddp``."""
    forward = model
    if compile_model:
        forward = torch.compile(forward)  # type: ignore[assignment]
    if cfg.kind == "ddp" and distributed.world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=ids)
    return forward
