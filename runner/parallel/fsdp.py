"""``parallel=fsdp``: FSDP2 (``fully_shard``) on each block and at the root, over all ranks.

Parameters become ``DTensor`` shards (dim 0 over the ranks); gradients and the optimizer state built over
them are sharded the same way, so a rank holds about 1/N of the training state. Forward and backward gather
a block's parameters just before they are needed and free them after (``reshard_after_forward``).
Checkpoints are written shard by shard through DCP and load at any world size (see runner.checkpoint).
Mixed precision is FSDP's own: ``parallel.param_dtype`` for compute, ``parallel.reduce_dtype`` for the
gradient reduction; stored parameters and optimizer state stay fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from runner import distributed
from runner.config import ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shard(model: nn.Module, blocks: list[nn.Module], cfg: ParallelConfig, device: torch.device) -> None:
    """``fully_shard`` each block, then the root (which holds what is left: embeddings, norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=_DTYPES[cfg.param_dtype] if cfg.param_dtype else None,
        reduce_dtype=_DTYPES[cfg.reduce_dtype] if cfg.reduce_dtype else None,
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    # NOTE: the root's parameters are needed again at once by the loss: no point resharding them after forward.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
