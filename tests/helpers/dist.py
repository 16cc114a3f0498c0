"""Several torch.distributed processes on this machine (gloo on CPU): ``torchrun`` in a process group of its own,
killed whole on a timeout or at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import cli_env
from tests.helpers.ports import free_port


def torchrun_cmd(module_args: Sequence[str], nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node=N --master_port=<free> -m <module_args...>``."""
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return [*run, "-m", *module_args]


def start(module_args: Sequence[str], cwd: Path, nproc: int = 2, log: Path | None = None) -> subprocess.Popen[str]:
    """Start torchrun in its own session (so :func:`stop` can kill every rank); output to ``log`` or a pipe."""
    out = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen(
        torchrun_cmd(module_args, nproc),
        cwd=cwd,
        env=cli_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to torchrun and every rank, and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def torchrun(
    module_args: Sequence[str], cwd: Path, nproc: int = 2, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run to the end; its output is in the assertion if it fails or hangs."""
    proc = start(module_args, cwd, nproc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout}s:\n{out}") from None
    assert proc.returncode == 0, out
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
