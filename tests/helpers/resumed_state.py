"""``python -m tests.helpers.resumed_state <checkpoint> <overrides...>`` (alone or under torchrun): resume a run
from ``<checkpoint>`` exactly as ``python -m runner`` does (the real Run: setup, then resume), then compare the
state it loaded, gathered whole on rank 0, with the checkpoint's tensors read on their own. Prints
``compared <n> tensors, <m> differ: ...`` on rank 0 and exits 1 if any differs.

Proves that loading at another world size or parallelism (FSDP 2 -> 1 rank, FSDP -> DDP, DDP -> FSDP) puts
exactly the saved tensors into the live model and optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import torch
from hydra import compose, initialize_config_dir
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from runner.__main__ import CONFIG_DIR
from runner.checkpoint.load import read_tensors
from runner.checkpoint.state import OPTIM, split_tensors
from runner.config import install, validate
from runner.run import Run


def main(checkpoint: str, overrides: list[str]) -> int:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[%(name)s][%(levelname)s] %(message)s")
    install()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"trainer.resume={checkpoint}"])
    validate(cfg)
    with contextlib.ExitStack() as stack:
        run = Run(cfg, stack)
        run.setup()
        run.resume()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(run.parts.model, run.parts.optimizer, options=options)
        if run.env.rank != 0:
            return 0
        optim, _ = split_tensors(optim_sd, OPTIM)
        loaded = {**{f"model.{k}": v for k, v in model_sd.items()}, **optim}
        saved = read_tensors(checkpoint)
        differ = sorted(k for k in saved if k not in loaded or not torch.equal(saved[k], loaded[k].cpu()))
        extra = sorted(set(loaded) - set(saved))
        print(f"compared {len(saved)} tensors, {len(differ) + len(extra)} differ: {(differ + extra)[:5]}", flush=True)
        return 1 if differ or extra or not saved else 0
    return 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
