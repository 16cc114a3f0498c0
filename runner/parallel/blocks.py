"""The model's repeated blocks: FSDP shards each one as a unit, activation checkpointing recomputes each one.

Which modules are blocks: the classes named in ``parallel.blocks``, or by default the repeated blocks of
the model, found the way every transformer lays them out: the children of an ``nn.ModuleList`` or
``nn.Sequential`` that share one class, two or more of them (runner's ViT: ``Block``; a timm ViT: ``Block``;
a torchvision ResNet: ``Bottleneck`` / ``BasicBlock``). The largest such group wins.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from runner.config import ConfigError


def _repeated(model: nn.Module) -> list[nn.Module]:
    best: list[nn.Module] = []
    for container in model.modules():
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            continue
        children = list(container.children())
        counts = Counter(type(c) for c in children)
        if not counts:
            continue
        kind, n = counts.most_common(1)[0]
        group = [c for c in children if type(c) is kind]
        size = sum(p.numel() for c in group for p in c.parameters())
        if n >= 2 and size > sum(p.numel() for c in best for p in c.parameters()):
            best = group
    return best


def find_blocks(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The block modules, outermost first (a block inside a block is not one of its own)."""
    found: list[nn.Module] = []
    if not names:
        found = _repeated(model)
        if not found:
            raise ConfigError(
                f"parallel.blocks: found no repeated blocks in {type(model).__name__}; name the block classes, "
                "e.g. parallel.blocks=[Block]"
            )
        return found
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    missing = sorted(set(names) - {type(m).__name__ for m in found})
    if missing:
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(
            f"parallel.blocks: no module of class {', '.join(missing)} in {type(model).__name__}; "
            f"its classes are {', '.join(classes)}"
        )
    return found


def checkpoint_blocks(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Recompute each block's activations in backward instead of keeping them (``trainer.activation_checkpointing``).

    Each block is replaced in its parent by a ``checkpoint_wrapper`` around it (non-reentrant), before any
    sharding (FSDP then shards the wrappers, as torchtitan does); the state-dict API strips the wrapper's key
    prefix, so checkpoints load either way. Returns the wrappers, in the blocks' order.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    wanted = {id(b) for b in blocks}
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                wrapper = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                setattr(parent, name, wrapper)
                wrapped.append(wrapper)
    return wrapped
