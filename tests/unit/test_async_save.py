"""Async checkpoints: same bytes as a sync save, snapshot isolation, errors surface, one in flight, no growth."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from runner.checkpoint import manifest
from runner.checkpoint.async_save import AsyncSaver, Frozen, SnapshotRaceError
from runner.checkpoint.errors import CheckpointError
from runner.checkpoint.layout import MANIFEST
from runner.checkpoint.load import read_tensors
from runner.checkpoint.save import Checkpointer
from runner.config import TrainerConfig
from runner.storage import LocalStorage
from runner.train.loop import Context, Hooks, Loop
from runner.train.metrics import NullSink
from runner.train.optim import ConstSchedule
from tests.helpers.state import make_state, train_steps


def same_checkpoint(a: str, b: str) -> None:
    """Same tensors bit for bit, same per-rank JSON, same files (the manifest differs only in its date)."""
    ta, tb = read_tensors(a), read_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 0
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert Path(a, "rank_0.json").read_text() == Path(b, "rank_0.json").read_text()
    ma, mb = (json.loads(Path(p, MANIFEST).read_text()) for p in (a, b))
    assert ma["files"].keys() == mb["files"].keys()
    assert ma["step"] == mb["step"]


def gated(ckpt: Checkpointer) -> tuple[threading.Event, list[str]]:
    """Make ``ckpt``'s background write wait for a gate; record when writes start and end."""
    gate, events = threading.Event(), []
    write = ckpt.write

    def slow_write(state: Any) -> str:
        events.append(f"start {state.step}")
        gate.wait(timeout=60)
        out = write(state)
        events.append(f"end {state.step}")
        return out

    ckpt.write = slow_write  # type: ignore[method-assign]
    return gate, events


def test_async_checkpoint_equals_sync_checkpoint(tmp_path: Path) -> None:
    state = make_state()
    train_steps(state, 3)
    sync_path = Checkpointer(str(tmp_path / "sync"), 2, "x").save(state)
    ckpt = Checkpointer(str(tmp_path / "async"), 2, "x")
    ckpt.enable_async()
    async_path = ckpt.save(state)
    ckpt.close()
    same_checkpoint(sync_path, async_path)


def test_training_on_while_writing_does_not_leak_into_the_checkpoint(tmp_path: Path) -> None:
    state = make_state()
    train_steps(state, 2)
    expected = Checkpointer(str(tmp_path / "sync"), 2, "x").save(state)
    ckpt = Checkpointer(str(tmp_path / "async"), 2, "x")
    gate, _ = gated(ckpt)
    ckpt.enable_async()
    path = ckpt.save(state)
    assert not Path(path, MANIFEST).exists()  # not committed yet: the write is held at the gate
    train_steps(state, 3)  # mutates weights and optimizer moments in place while the save is in flight
    gate.set()
    ckpt.wait()
    same_checkpoint(expected, path)
    ckpt.close()


def test_block_returns_only_once_committed(tmp_path: Path) -> None:
    state = make_state()
    train_steps(state, 1)
    ckpt = Checkpointer(str(tmp_path), 2, "x")
    ckpt.enable_async()
    path = ckpt.save(state, block=True)
    assert manifest.verify(LocalStorage(path), "")[0] is not None
    ckpt.close()


def test_background_failure_is_raised_on_the_training_thread(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), 2, "x")

    def broken(state: Any) -> str:
        raise CheckpointError(f"disk full at step {state.step}")

    ckpt.write = broken  # type: ignore[method-assign]
    ckpt.enable_async()
    state = make_state()
    cfg = TrainerConfig(max_steps=8, batch_size=8, log_every=2, eval_every=100, ckpt_every=2, eval_batches=1)
    with pytest.raises(CheckpointError, match="disk full at step 2"):
        Loop(
            state,
            state.model,
            ConstSchedule(base_lr=1e-3, total_steps=8),
            [],
            cfg,
            Context(torch.device("cpu"), 8, NullSink(), Hooks(save=ckpt.save, check=ckpt.check), show_progress=False),
        ).fit()
    # Raised at the next step boundary, or at the latest by the next save (step 4): never lost.
    assert state.step <= 4
    ckpt.close()  # the failure was consumed by the raise above


def test_check_raises_a_finished_failure_and_close_raises_it_too(tmp_path: Path) -> None:
    done = threading.Event()

    def broken(frozen: Frozen) -> str:
        try:
            raise OSError("no space left on device")
        finally:
            done.set()

    saver = AsyncSaver(broken, lambda step: f"step_{step}")
    state = make_state()
    saver.save(state)
    done.wait(timeout=60)
    while saver.busy:  # the future is marked done just after the function returns
        threading.Event().wait(0.01)
    with pytest.raises(OSError, match="no space"):
        saver.check()
    saver.check()  # reported once, then cleared
    saver.save(state)
    with pytest.raises(OSError, match="no space"):
        saver.close()


def test_at_most_one_in_flight_wait_blocks_until_the_previous_commits(tmp_path: Path) -> None:
    state = make_state()
    ckpt = Checkpointer(str(tmp_path), 5, "x")
    gate, events = gated(ckpt)
    ckpt.enable_async(in_flight="wait")
    train_steps(state, 1)
    ckpt.save(state)
    train_steps(state, 1)
    second = threading.Thread(target=ckpt.save, args=(state,))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "a second save started while the first was still in flight"
    gate.set()
    second.join(timeout=60)
    ckpt.close()
    assert events == ["start 1", "end 1", "start 2", "end 2"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2"]


def test_skip_mode_skips_while_one_is_in_flight_but_never_a_blocking_save(tmp_path: Path) -> None:
    state = make_state()
    ckpt = Checkpointer(str(tmp_path), 5, "x")
    gate, _ = gated(ckpt)
    ckpt.enable_async(in_flight="skip")
    train_steps(state, 1)
    ckpt.save(state)
    train_steps(state, 1)
    assert ckpt.save(state) == ""  # skipped: step 1 is still being written
    train_steps(state, 1)
    gate.set()
    final = ckpt.save(state, block=True)  # a final / preemption save is never skipped
    ckpt.close()
    assert Path(final, MANIFEST).exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_3"]


def test_with_several_ranks_a_save_is_skipped_when_any_rank_is_busy_and_a_snapshot_fails_everywhere(
    tmp_path: Path,
) -> None:
    """``agree`` stands in for the collective (distributed.first_error) that gives every rank the same
    decision: here the other rank is still writing, or its snapshot failed, while this one is fine."""
    other: dict[str, str | None] = {"says": None}
    asked: list[str | None] = []

    def agree(mine: str | None) -> str | None:
        asked.append(mine)
        return mine if mine is not None else other["says"]

    state = make_state()
    ckpt = Checkpointer(str(tmp_path), 5, "x")
    writes: list[int] = []
    ckpt._async = AsyncSaver(lambda f: writes.append(f.step) or "", ckpt.folder_of, in_flight="skip", agree=agree)
    train_steps(state, 1)
    other["says"] = "busy"
    assert ckpt.save(state) == "" and writes == []  # skipped here too: no rank writes a save others skip
    other["says"] = "rank 1: OSError: disk on fire"
    with pytest.raises(CheckpointError, match="step 1 failed: rank 1: OSError: disk on fire"):
        ckpt.save(state, block=True)  # a blocking save is never skipped, but a failed snapshot fails it
    other["says"] = None
    ckpt.save(state, block=True)
    ckpt.close()
    assert writes == [1] and None in asked


def test_snapshot_buffers_are_reused_across_saves(tmp_path: Path) -> None:
    state = make_state()
    train_steps(state, 1)  # optimizer state exists from here on
    ckpt = Checkpointer(str(tmp_path), 2, "x")
    ckpt.enable_async()
    ckpt.save(state)
    assert ckpt._async is not None
    snapshot = ckpt._async.snapshot
    first = {k: b.data_ptr() for k, b in snapshot.buffers.items()}
    size = snapshot.nbytes
    for _ in range(3):
        train_steps(state, 1)
        ckpt.save(state)
    ckpt.close()
    assert {k: b.data_ptr() for k, b in snapshot.buffers.items()} == first
    assert snapshot.nbytes == size > 0


def test_final_save_of_fit_is_committed_when_fit_returns(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), 2, "x")
    gate, _ = gated(ckpt)
    gate.set()
    ckpt.enable_async()
    state = make_state()
    cfg = TrainerConfig(max_steps=4, batch_size=8, log_every=2, eval_every=100, ckpt_every=2, eval_batches=1)
    Loop(
        state,
        state.model,
        ConstSchedule(base_lr=1e-3, total_steps=4),
        [],
        cfg,
        Context(torch.device("cpu"), 8, NullSink(), Hooks(save=ckpt.save, check=ckpt.check), show_progress=False),
    ).fit()
    assert Path(ckpt.folder_of(4), MANIFEST).exists()
    ckpt.close()


def hold_copies(ckpt: Checkpointer) -> threading.Event:
    """Keep the worker from making its deferred copies until the returned gate opens."""
    assert ckpt._async is not None
    snapshot = ckpt._async.snapshot
    finish, gate = snapshot.finish, threading.Event()

    def held() -> None:
        gate.wait(timeout=60)
        finish()

    snapshot.finish = held  # type: ignore[method-assign]
    return gate


def step_with_fence(state: Any, fence: Any, opened: threading.Event) -> None:
    x, y = next(state.data)
    torch.nn.functional.cross_entropy(state.model(x), y).backward()
    threading.Timer(0.2, opened.set).start()  # the worker's copies land while the fence waits
    fence()
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.step += 1


def test_deferred_copies_finish_before_the_next_optimizer_step(tmp_path: Path) -> None:
    state = make_state()
    train_steps(state, 2)
    expected = Checkpointer(str(tmp_path / "sync"), 2, "x").save(state)
    ckpt = Checkpointer(str(tmp_path / "async"), 2, "x")
    ckpt.enable_async(defer_copy=True)
    gate = hold_copies(ckpt)
    path = ckpt.save(state)
    step_with_fence(state, ckpt.fence, gate)
    train_steps(state, 2)
    ckpt.wait()
    same_checkpoint(expected, path)
    ckpt.close()


def test_a_forgotten_fence_fails_the_save_instead_of_tearing_it(tmp_path: Path) -> None:
    state = make_state()
    train_steps(state, 2)
    ckpt = Checkpointer(str(tmp_path), 2, "x")
    ckpt.enable_async(defer_copy=True)
    gate = hold_copies(ckpt)
    ckpt.save(state)
    train_steps(state, 1)  # an optimizer step without ckpt.fence()
    gate.set()
    with pytest.raises(SnapshotRaceError, match="changed while an async checkpoint was copying"):
        ckpt.wait()
    assert not (tmp_path / "checkpoints" / "step_2").exists()
    ckpt.close()
