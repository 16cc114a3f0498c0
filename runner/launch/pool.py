"""A local device pool: run sweep members N at a time, each pinned to its own device slots.

This module knows nothing about Hydra (the launcher plugin in ``hydra_plugins/runner_pool`` adapts it):
it takes commands, hands each one ``slots_per_member`` free slots when they are available, runs it in
its own process group with its output in a log file, and reports start/end times, slots, exit code and
log path for every member. A member that fails is reported with its log path; the others keep running.

Slots are GPU indices (pinned through ``CUDA_VISIBLE_DEVICES``) on a CUDA machine, else CPU cores (pinned
through the member's CPU affinity, set by the worker from ``RUNNER_POOL_CPUS``, and ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

CPU_ENV = "RUNNER_POOL_CPUS"


class PoolConfigError(ValueError):
    """The pool's settings cannot work on this machine (the message names the setting and the fix)."""


@dataclass(frozen=True)
class Devices:
    kind: str  # "cuda" or "cpu"
    ids: tuple[int, ...]


def detect_devices(device: str) -> Devices:
    """Visible GPUs when ``device`` is cuda (or auto and there are any), else the CPUs we may run on."""
    if device not in ("auto", "cuda", "cpu"):
        raise PoolConfigError(f"hydra.launcher.device={device!r}: choose one of auto, cuda, cpu")
    if device != "cpu":
        import torch  # NOTE: lazily, so Hydra's plugin discovery stays fast.

        count = torch.cuda.device_count()
        if count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [int(x) for x in visible.split(",") if x.strip()] if visible else list(range(count))
            return Devices("cuda", tuple(ids[:count]))
        if device == "cuda":
            raise PoolConfigError("hydra.launcher.device=cuda but no CUDA device is visible; use device=cpu")
    return Devices("cpu", tuple(sorted(os.sched_getaffinity(0))))


def plan(devices: Devices, slots: int | None, slots_per_member: int, max_parallel: int | None) -> tuple[int, int]:
    """(number of slots, members at once), validated."""
    total = slots if slots is not None else len(devices.ids)
    if total < 1:
        raise PoolConfigError(f"hydra.launcher.slots={slots}: must be >= 1")
    if devices.kind == "cuda" and total > len(devices.ids):
        raise PoolConfigError(f"hydra.launcher.slots={total} but only {len(devices.ids)} GPUs are visible; lower slots")
    if not 1 <= slots_per_member <= total:
        raise PoolConfigError(
            f"hydra.launcher.slots_per_member={slots_per_member}: must be between 1 and slots={total}"
        )
    parallel = total // slots_per_member
    if max_parallel is not None:
        if max_parallel < 1:
            raise PoolConfigError(f"hydra.launcher.max_parallel={max_parallel}: must be >= 1")
        parallel = min(parallel, max_parallel)
    return total, parallel


def pin_env(devices: Devices, slots: Sequence[int]) -> dict[str, str]:
    """Environment that confines a member to ``slots`` (indices into ``devices.ids``)."""
    chosen = [devices.ids[s % len(devices.ids)] for s in slots]
    if devices.kind == "cuda":
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, chosen))}
    return {CPU_ENV: ",".join(map(str, chosen)), "OMP_NUM_THREADS": str(len(slots)), "CUDA_VISIBLE_DEVICES": ""}


def apply_cpu_pinning() -> None:
    """In the member process: restrict it to the CPUs the pool gave it (no-op outside the pool)."""
    cpus = os.environ.get(CPU_ENV)
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


@dataclass
class Member:
    index: int
    command: list[str]
    log_path: str
    label: str = ""
    slots: list[int] = field(default_factory=list)
    pid: int = 0
    start: float = 0.0
    end: float = 0.0
    returncode: int | None = None


@dataclass
class PoolSettings:
    """How a pool runs its members (see :class:`Pool`).

    ``requeue_code``: a member that exits with it (it saved a checkpoint on a preemption signal) is queued
    again, and resumes from that checkpoint. ``stop_signal``: what running members get once a stop is
    requested (to save and exit). ``drop_env``: variables the members must not inherit; ``env``: added.
    """

    devices: Devices
    total_slots: int
    slots_per_member: int
    parallel: int
    events_path: str
    env: dict[str, str] = field(default_factory=dict)
    drop_env: Sequence[str] = ()
    requeue_code: int | None = None
    stop_signal: int = signal.SIGUSR2
    poll_s: float = 0.2


class Pool:
    """Runs members at most ``parallel`` at once, each in its own process group on its own slots."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.free = list(range(settings.total_slots))
        self.pending: list[Member] = []
        self.running: dict[int, tuple[Member, subprocess.Popen[bytes]]] = {}
        self.stopping = False
        self.base_env = {k: v for k, v in os.environ.items() if k not in settings.drop_env}

    def run(
        self,
        members: Sequence[Member],
        stop: Callable[[], bool] | None = None,
        on_end: Callable[[Member], None] | None = None,
    ) -> list[Member]:
        """Run every member; returns them finished. Once ``stop()`` is true no member starts any more and the
        running ones get the stop signal; this returns when they have exited. ``on_end`` is called as each
        member process ends (and is not queued again)."""
        self.pending = list(members)
        os.makedirs(os.path.dirname(self.settings.events_path) or ".", exist_ok=True)
        try:
            while self.running or (self.pending and not self.stopping):
                if stop is not None and not self.stopping and stop():
                    self._stop_all()
                while self._can_start():
                    self._start(self.pending.pop(0))
                for pid, (member, proc) in list(self.running.items()):
                    code = proc.poll()
                    if code is not None:
                        del self.running[pid]
                        self._ended(member, code, on_end)
                time.sleep(self.settings.poll_s)
        finally:
            for _member, proc in self.running.values():  # interrupted: take every member's process group down
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        return list(members)

    def _can_start(self) -> bool:
        s = self.settings
        return (
            not self.stopping
            and bool(self.pending)
            and len(self.running) < s.parallel
            and (len(self.free) >= s.slots_per_member)
        )

    def _stop_all(self) -> None:
        self.stopping = True
        log.warning("pool: stop requested; %d member(s) asked to save and exit", len(self.running))
        for _member, proc in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self.settings.stop_signal)

    def _start(self, member: Member) -> None:
        s = self.settings
        member.slots, self.free = self.free[: s.slots_per_member], self.free[s.slots_per_member :]
        os.makedirs(os.path.dirname(member.log_path) or ".", exist_ok=True)
        with open(member.log_path, "ab") as out:
            proc = subprocess.Popen(
                member.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.base_env, **s.env, **pin_env(s.devices, member.slots)},
                start_new_session=True,
            )
        member.pid, member.start = proc.pid, time.time()
        self.running[proc.pid] = (member, proc)
        where = f"{s.devices.kind} slots {member.slots}"
        log.info("pool: #%d %s started on %s (log %s)", member.index, member.label, where, member.log_path)

    def _ended(self, member: Member, code: int, on_end: Callable[[Member], None] | None) -> None:
        member.end, member.returncode = time.time(), code
        self.free = sorted(self.free + member.slots)
        _append_event(self.settings.events_path, member)
        if self.settings.requeue_code is not None and code == self.settings.requeue_code:
            if self.stopping:  # saved for the job's requeue: it runs again when the job does
                log.warning("pool: #%d %s saved; it resumes when the job is requeued", member.index, member.label)
            else:
                log.warning("pool: #%d %s saved on a preemption signal; running it again", member.index, member.label)
                self.pending.insert(0, member)
            return
        if on_end is not None:
            on_end(member)
        if code == 0:
            log.info("pool: #%d %s finished in %.1fs", member.index, member.label, member.end - member.start)
        else:
            log.error(
                "pool: #%d %s FAILED with exit code %d; log: %s", member.index, member.label, code, member.log_path
            )


def _append_event(path: str, member: Member) -> None:
    record = {k: v for k, v in asdict(member).items() if k != "command"}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
