"""What ``python -m runner.sweep`` does: read the ledger (corrected by sacct), show it, act on its members.

Resubmitting (``resume``, ``retry-failed``) launches the sweep again exactly as it was launched (the overrides
kept in ``.ledger/sweep.json``, from its original working directory, into the same sweep directory), with
``hydra.sweeper.only`` naming the members to run: each keeps its overrides, hence its name and run directory,
and resumes from its own newest checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from runner.sweep import ledger
from runner.sweep.ledger import Record

SLURM_TARGET = "hydra_plugins.runner_slurm"


class SweepError(Exception):
    """A sweep command cannot do what was asked; the message (one line) says why and what to do."""


def load(sweep_dir: str, use_sacct: bool = True) -> list[Record]:
    records = ledger.correct_local(sweep_dir, ledger.read(sweep_dir))
    if use_sacct and shutil.which("sacct") and any(r.job_id and not r.terminal for r in records):
        records = ledger.correct_from_sacct(sweep_dir, records)
    return records


# ----------------------------------------------------------------------------- status
def _fmt_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt_objective(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def member_label(r: Record) -> str:
    return r.name or " ".join(r.overrides) or r.key


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def status_text(sweep_dir: str, records: list[Record], now: float | None = None) -> str:
    now = now or time.time()
    rows = []
    for r in records:
        progress = f"{r.step if r.step is not None else 0}/{r.total}" if r.total else "-"
        rows.append(
            [
                str(r.index) if r.index is not None else "?",
                member_label(r),
                r.state,
                progress,
                _fmt_objective(r.objective),
                _fmt_elapsed(r.elapsed_s(now)),
                r.job_id or "-",
            ]
        )
    header = ["#", "member", "state", "step", "objective", "elapsed", "job"]
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
    out = [f"sweep {sweep_dir}: {len(records)} members ({summary})", table(rows, header)]
    for r in records:
        if r.state not in (ledger.COMPLETED, ledger.RUNNING, ledger.SUBMITTED) and (r.error or r.exit_reason):
            out.append(f"#{r.index} {r.state.lower()}: {r.error or r.exit_reason} (log: {r.log_path or '-'})")
    return "\n".join(out)


def status_json(records: list[Record], now: float | None = None) -> str:
    now = now or time.time()
    return json.dumps(
        [{**r.as_dict(), "elapsed_s": r.elapsed_s(now)} for r in records],
        indent=2,
        default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v),
    )


def watch(sweep_dir: str, interval_s: float, once: bool = False) -> int:
    while True:
        records = load(sweep_dir)
        text = status_text(sweep_dir, records)
        sys.stdout.write("\x1b[H\x1b[2J" + text + f"\n(refreshing every {interval_s:g}s; Ctrl-C to stop)\n")
        sys.stdout.flush()
        if once or all(r.terminal for r in records):
            return 0
        time.sleep(interval_s)


# ----------------------------------------------------------------------------- resubmission
def check_compatible(records: Sequence[Record], config_dir: str) -> None:
    """Refuse (one line) when a member's config, composed today, trains something else than what it started."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from runner.checkpoint.manifest import config_hash
    from runner.config import install
    from runner.run import TRAINED

    started = [r for r in records if r.config_hash]
    if not started:
        return
    install()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        for r in started:
            cfg = compose(config_name="config", overrides=list(r.overrides))
            now = config_hash({k: OmegaConf.to_container(cfg[k], resolve=True) for k in TRAINED}, cfg.trainer.seed)
            if now != r.config_hash:
                raise SweepError(
                    f"member #{r.index} ({member_label(r)}): its config changed since it started (config hash "
                    f"{r.config_hash} -> {now}); resuming would mix two experiments. Undo the change, or launch "
                    "a new sweep"
                )


def resubmit_command(info: dict[str, Any], sweep_dir: str, keys: Sequence[str]) -> list[str]:
    """The sweep's own launch command again, into the same sweep directory, for the members ``keys``."""
    dropped = ("hydra.sweep.dir=", "hydra.sweeper.only=", "hydra.launcher.wait=", "hydra.mode=")
    hydra = [o for o in info["hydra"] if not o.lstrip("+~").startswith(dropped)]
    # NOTE: quoted: a sweep directory's name holds commas (its overrides), which Hydra would read as a sweep.
    quoted = os.path.abspath(sweep_dir).replace("\\", "\\\\").replace("'", "\\'")
    extra = [f"hydra.sweep.dir='{quoted}'", f"hydra.sweeper.only=[{','.join(keys)}]"]
    if str(info.get("launcher", "")).startswith(SLURM_TARGET):
        extra.append("hydra.launcher.wait=false")  # resubmitting detaches; `status` follows the members
    return [str(info.get("python") or sys.executable), "-m", "runner", "-m", *hydra, *info["task"], *extra]


def resubmit(sweep_dir: str, records: Sequence[Record], what: str, config_dir: str, dry_run: bool = False) -> int:
    if not records:
        print(f"{what}: nothing to resubmit in {sweep_dir}")
        return 0
    check_compatible(records, config_dir)
    info = ledger.read_sweep_info(sweep_dir)
    command = resubmit_command(info, sweep_dir, [r.key for r in records])
    names = ", ".join(f"#{r.index} {member_label(r)} ({r.state.lower()})" for r in records)
    print(f"{what}: resubmitting {len(records)} member(s), each from its own newest checkpoint: {names}")
    if dry_run:
        print(" ".join(command))
        return 0
    return subprocess.run(command, cwd=str(info.get("cwd") or os.getcwd()), check=False).returncode


def cancel(sweep_dir: str, records: Sequence[Record]) -> int:
    ids = [str(r.job_id) for r in records if r.job_id and not r.terminal]
    if not ids:
        print(f"cancel: no running or pending member with a SLURM job in {sweep_dir}")
        return 0
    if shutil.which("scancel") is None:
        raise SweepError("cancel: scancel is not on PATH (run it on the cluster's login node)")
    proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SweepError(f"cancel: scancel {' '.join(ids)} failed: {proc.stderr.strip() or proc.returncode}")
    for r in records:
        if r.job_id in ids:
            ledger.append(sweep_dir, r.overrides, "cancel_requested", job_id=r.job_id)
    print(f"cancel: cancelled {len(ids)} member job(s): {' '.join(ids)}")
    return 0
