"""The requeue signal only sets a flag; the requeue itself happens after the checkpoint, rank 0 only."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.launch import requeue
from runner.launch.requeue import Preemption


class FakeSubmititHandler:
    """Stands in for submitit's SignalHandler (Preemption recognises it by its module)."""

    __module__ = "submitit.core.job_environment"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def checkpoint_and_try_requeue(self, signum: int, frame: Any = None) -> None:
        self.calls.append(signum)
        raise SystemExit(-1)  # what submitit does after `scontrol requeue`


@pytest.fixture
def submitit_handler() -> Iterator[FakeSubmititHandler]:
    fake = FakeSubmititHandler()
    previous = signal.signal(signal.SIGUSR2, fake.checkpoint_and_try_requeue)
    try:
        yield fake
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_not_installed_outside_submitit() -> None:
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        assert Preemption.install(rank=0) is None
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_signal_only_sets_the_flag(submitit_handler: FakeSubmititHandler) -> None:
    preemption = Preemption.install(rank=0)
    assert preemption is not None and not preemption.requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption.requested()
    assert submitit_handler.calls == []  # submitit's requeue did not run inside the signal handler
    preemption.restore()
    assert signal.getsignal(signal.SIGUSR2) == submitit_handler.checkpoint_and_try_requeue


def test_rank0_hands_over_to_submitit(submitit_handler: FakeSubmititHandler) -> None:
    preemption = Preemption.install(rank=0)
    assert preemption is not None
    with pytest.raises(SystemExit):
        preemption.requeue()
    assert submitit_handler.calls == [signal.SIGUSR2]


def test_other_ranks_wait_for_the_requeue_and_never_report_a_result(
    submitit_handler: FakeSubmititHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    preemption = Preemption.install(rank=1)
    assert preemption is not None
    slept: list[float] = []
    monkeypatch.setattr(requeue.time, "sleep", slept.append)
    with pytest.raises(SystemExit) as exit_info:
        preemption.requeue()
    assert exit_info.value.code == 1 and slept == [requeue.WAIT_FOR_REQUEUE_S]
    assert submitit_handler.calls == []  # only global rank 0 requeues


def test_the_final_sync_runs_before_the_job_is_handed_back(
    submitit_handler: FakeSubmititHandler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real (in-process) run with a remote, signalled as it starts: when submitit's handler is finally
    called to requeue, the checkpoint saved at the signal must already be on the remote, with its manifest."""
    from hydra import compose, initialize_config_dir

    from runner.__main__ import CONFIG_DIR
    from runner.run import run

    remote = tmp_path / "remote"
    seen: list[bool] = []

    class Watching(FakeSubmititHandler):
        __module__ = FakeSubmititHandler.__module__

        def checkpoint_and_try_requeue(self, signum: int, frame: Any = None) -> None:
            seen.append(any(remote.glob("*/checkpoints/step_*/manifest.json")))
            super().checkpoint_and_try_requeue(signum, frame)

    handler = Watching()
    signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    install = Preemption.install

    def install_and_signal(rank: int) -> Preemption | None:
        preemption = install(rank)
        os.kill(os.getpid(), signal.SIGUSR2)  # as if SLURM signalled the job while it started
        return preemption

    monkeypatch.setattr(requeue.Preemption, "install", staticmethod(install_and_signal))
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["name=requeued", "+debug=tiny", f"storage.url=file://{remote}"])
    with pytest.raises(SystemExit):
        run(cfg)
    assert handler.calls == [signal.SIGUSR2]  # handed back once
    assert seen == [True], "the job was handed back before the final sync put its checkpoint on the remote"
    assert (remote / "requeued" / "checkpoints" / "step_1" / "manifest.json").exists()
