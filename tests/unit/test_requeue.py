"""The requeue signal only sets a flag; the requeue itself happens after the checkpoint, rank 0 only."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
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


def test_rank0_runs_callbacks_then_hands_over_to_submitit(submitit_handler: FakeSubmititHandler) -> None:
    preemption = Preemption.install(rank=0)
    assert preemption is not None
    order: list[str] = []
    preemption.before_requeue.append(lambda: order.append("sync"))
    with pytest.raises(SystemExit):
        preemption.requeue()
    assert order == ["sync"] and submitit_handler.calls == [signal.SIGUSR2]


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
