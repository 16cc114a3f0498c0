"""The sweep ledger: one record per member, in ``<sweep dir>/.ledger/``, the truth the sweep commands read.

Each member has its own append-only file, ``<key>.jsonl``, where ``key`` is a digest of the member's
overrides (the launcher and the member both know them; the member's name and index are not known to both).
Each line is one event (``submitted``, ``started``, ``progress``, ``finished``, ``failed``, ...), written
with one ``O_APPEND`` ``write`` and an ``fsync``. Writers of different members never share a file, so
members ending at the same instant on different nodes cannot corrupt or lose each other's records (the
locked shared JSON file of our lineage could, and serialised every writer on one lock). A member's record
is its events folded in order; a torn last line (a crash mid-write) is skipped.

SLURM's accounting corrects the fold where a member died without writing (``scancel``, wall time, a lost
node): see :func:`correct_from_sacct`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

LEDGER_DIR = ".ledger"
#: What the sweep was launched with (overrides, launcher, working directory): written once, by the sweeper.
SWEEP_FILE = "sweep.json"

# Member states. Terminal ones end a member's life until it is resubmitted.
SUBMITTED, RUNNING, REQUEUED, COMPLETED, FAILED = "SUBMITTED", "RUNNING", "REQUEUED", "COMPLETED", "FAILED"
CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY = "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"
#: A local (pool) member whose process, or whose launcher's, is gone without a word: killed with it.
LOST = "LOST"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, LOST})
#: sacct states that end a job without the member having had a chance to say so.
_SLURM_DEATHS = {
    "CANCELLED": CANCELLED,
    "TIMEOUT": TIMEOUT,
    "NODE_FAIL": NODE_FAIL,
    "OUT_OF_MEMORY": OUT_OF_MEMORY,
    "FAILED": FAILED,
    "BOOT_FAIL": FAILED,
    "DEADLINE": TIMEOUT,
}


class NotASweep(Exception):
    """The directory has no ledger (the message says which directory)."""


def member_key(overrides: Sequence[str]) -> str:
    """The member's ledger file name: a digest of its overrides, the same in the launcher and the member."""
    return hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:16]


def ledger_dir(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, LEDGER_DIR)


def append(sweep_dir: str, overrides: Sequence[str], event: str, **fields: Any) -> None:
    """Append one event to the member's file: one ``O_APPEND`` write, then ``fsync`` (crash-safe)."""
    folder = ledger_dir(sweep_dir)
    os.makedirs(folder, exist_ok=True)
    record = {"event": event, "time": round(time.time(), 3), "overrides": list(overrides), **fields}
    record.setdefault("host", os.uname().nodename)
    record.setdefault("pid", os.getpid())
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(os.path.join(folder, f"{member_key(overrides)}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # NOTE: one write call for the whole line: with O_APPEND the kernel places it at the end atomically,
        # so two writers of the same file (launcher and member) interleave whole lines, never bytes.
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to the sweep ledger ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Record:
    """A member's current state: its events folded in order."""

    key: str
    overrides: list[str] = field(default_factory=list)
    index: int | None = None
    name: str | None = None
    run_dir: str | None = None
    job_id: str | None = None
    state: str = SUBMITTED
    submitted: float | None = None
    start: float | None = None
    end: float | None = None
    exit_reason: str | None = None
    error: str | None = None
    log_path: str | None = None
    objective: float | None = None
    step: int | None = None
    total: int | None = None
    config_hash: str | None = None
    attempts: int = 0
    resumed_from: int | None = None
    #: Host and pid of the last writer that is supposed to be alive (the launcher, then the member).
    host: str | None = None
    pid: int | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def elapsed_s(self, now: float | None = None) -> float | None:
        if self.start is None:
            return None
        return (self.end if self.end is not None and self.terminal else (now or time.time())) - self.start

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fold(key: str, events: Iterable[dict[str, Any]]) -> Record:
    r = Record(key)
    for e in events:
        kind = e.get("event")
        r.overrides = list(e.get("overrides", r.overrides))
        for name in ("index", "name", "run_dir", "job_id", "log_path", "total", "config_hash"):
            if e.get(name) is not None and not (name == "index" and r.index is not None):
                setattr(r, name, e[name])
        if kind in ("submitted", "started"):
            r.host, r.pid = e.get("host"), e.get("pid")
        if kind == "submitted":
            r.state, r.submitted, r.end, r.exit_reason, r.error = SUBMITTED, e["time"], None, None, None
        elif kind == "started":
            r.state, r.start, r.end, r.exit_reason, r.error = RUNNING, e["time"], None, None, None
            r.attempts += 1
            r.resumed_from = None
        elif kind == "progress":
            r.step = int(e["step"])
            if r.state != RUNNING and not r.terminal:
                r.state = RUNNING
        elif kind == "resumed":
            r.resumed_from = e.get("step")
            r.step = max(r.step or 0, int(e.get("step") or 0))
        elif kind == "requeued":
            r.state, r.exit_reason = REQUEUED, e.get("reason", "requeued")
        elif kind == "finished":
            r.state, r.end, r.exit_reason = COMPLETED, e["time"], "completed"
            r.objective = e.get("objective")
            r.step = e["step"] if e.get("step") is not None else r.step
        elif kind == "failed":
            r.state, r.end = FAILED, e["time"]
            r.exit_reason, r.error = e.get("reason", "raised"), e.get("error")
        elif kind == "lost":
            r.state, r.end, r.exit_reason = LOST, e["time"], e.get("reason")
        elif kind == "slurm":  # a correction from sacct, written by a command that read it
            r.state, r.end, r.exit_reason = e["state"], e.get("end") or e["time"], f"slurm: {e['slurm_state']}"
    return r


def read_member(path: str) -> list[dict[str, Any]]:
    events = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                events.append(json.loads(raw))
            except ValueError:  # a torn line: the writer crashed mid-write (only ever the last one)
                log.warning("skipping a torn ledger line in %s", path)
    return events


def is_sweep(sweep_dir: str) -> bool:
    return os.path.isdir(ledger_dir(sweep_dir))


def read(sweep_dir: str) -> list[Record]:
    """Every member's current record, by member index (then key)."""
    folder = ledger_dir(sweep_dir)
    if not os.path.isdir(folder):
        raise NotASweep(f"{sweep_dir} is not a sweep directory (no {LEDGER_DIR}/ ledger in it)")
    records = [
        fold(name[: -len(".jsonl")], read_member(os.path.join(folder, name)))
        for name in os.listdir(folder)
        if name.endswith(".jsonl")
    ]
    return sorted(records, key=lambda r: (r.index if r.index is not None else 1 << 30, r.key))


def write_sweep_info(sweep_dir: str, info: dict[str, Any]) -> None:
    """What the sweep was launched with, kept from its first launch (resume and retry launch it again)."""
    folder = ledger_dir(sweep_dir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SWEEP_FILE)
    if os.path.exists(path):
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_sweep_info(sweep_dir: str) -> dict[str, Any]:
    path = os.path.join(ledger_dir(sweep_dir), SWEEP_FILE)
    if not os.path.exists(path):
        raise NotASweep(f"{sweep_dir}: the ledger has no {SWEEP_FILE} (it was not launched by runner's sweeper)")
    with open(path) as f:
        info: dict[str, Any] = json.load(f)
    return info


# ----------------------------------------------------------------------------- SLURM corrections
def sacct_states(job_ids: Sequence[str]) -> dict[str, tuple[str, float | None]]:
    """``{job id: (state, end time)}`` from SLURM's accounting; empty when sacct is not there."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-o", "JobID,State,End", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("sacct is not available (%s): the ledger is shown as the members wrote it", e)
        return {}
    states: dict[str, tuple[str, float | None]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 3:
            continue
        job, state, end = parts[0], parts[1].split()[0], parts[2]
        end_s = None
        if end and end not in ("Unknown", "None"):
            try:
                end_s = time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                end_s = None
        states[job] = (state, end_s)
    return states


def correct_from_sacct(
    sweep_dir: str, records: list[Record], states: dict[str, tuple[str, float | None]] | None = None
) -> list[Record]:
    """Members the ledger shows alive whose SLURM job is dead (cancelled, timed out, node lost, ...) without
    having written so: the correction is appended to their ledger (so it is read once, then kept)."""
    alive = [r for r in records if not r.terminal and r.job_id]
    if states is None:
        states = sacct_states([str(r.job_id) for r in alive])
    out = []
    for r in records:
        state = states.get(str(r.job_id)) if r in alive else None
        if state is not None and state[0] in _SLURM_DEATHS:
            append(sweep_dir, r.overrides, "slurm", state=_SLURM_DEATHS[state[0]], slurm_state=state[0], end=state[1])
            r = fold(r.key, read_member(os.path.join(ledger_dir(sweep_dir), f"{r.key}.jsonl")))
        out.append(r)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def correct_local(sweep_dir: str, records: list[Record]) -> list[Record]:
    """Members without a SLURM job (pool) shown alive whose process on this host is gone: marked lost."""
    here = os.uname().nodename
    out = []
    for r in records:
        if not r.terminal and not r.job_id and r.host == here and r.pid and not _pid_alive(r.pid):
            reason = f"process {r.pid} on {here} ended without reporting (killed, or its launcher was)"
            append(sweep_dir, r.overrides, "lost", reason=reason, host=None, pid=None)
            r = fold(r.key, read_member(os.path.join(ledger_dir(sweep_dir), f"{r.key}.jsonl")))
        out.append(r)
    return out
