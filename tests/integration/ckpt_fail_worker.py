"""One rank of the checkpoint-failure test:
``python ckpt_fail_worker.py <run_dir> <phase> <failing rank> <sync|async>``.

Joins a gloo process group from RANK/WORLD_SIZE/MASTER_*, saves a small TrainState with every rank and
makes one rank fail in ``phase`` (prepare: before DCP; write: inside DCP's storage writer; commit: rank
0's manifest). ``async`` saves in the background on a process group of its own, as a multi-rank run does,
while the main thread runs collectives of its own. Prints ``RAISED <message>`` and exits 3 when the save
raises; exits 0 if it did not.
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.checkpoint import FileSystemWriter

from runner import distributed
from runner.checkpoint import errors, save
from runner.checkpoint.state import TrainState
from runner.train.data import SyntheticImages, TrainStream


def main(run_dir: str, phase: str, failing: int, mode: str) -> int:
    env = distributed.detect()
    distributed.init(env, torch.device("cpu"), timeout_s=120)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    stream = TrainStream(SyntheticImages(64, 8, 4, 0.5, 0, 0), 4, 0, (env.rank, env.world_size))
    state = TrainState(model, optimizer, stream)
    state.step = 7
    group = distributed.side_group(120) if mode == "async" else None
    saver = save.Checkpointer(run_dir, keep_latest_k=2, config_hash="test", group=group)
    if mode == "async":
        saver.enable_async()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(f"injected failure on rank {env.rank}")

    if env.rank == failing:
        if phase == "prepare":
            state.tensors_and_meta = fail  # type: ignore[method-assign,assignment]
        elif phase == "write":
            FileSystemWriter.write_data = fail  # type: ignore[method-assign,assignment]
        elif phase == "commit":
            saver._commit = fail  # type: ignore[method-assign,assignment]
        else:
            raise SystemExit(f"unknown phase {phase!r}")
    try:
        saver.save(state)
        for _ in range(20):  # training's collectives, on the default group, while the save runs
            distributed.all_mean(torch.ones(1))
        saver.wait()
    except errors.CheckpointError as e:
        print(f"RAISED {e}", flush=True)
        return 3
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
