"""``python -m runner ARGS`` run inside the test process: the same entry (``runner.__main__.cli``), without the
2-3 s a new interpreter spends importing torch.

For tests of what a run does (its messages, exit code, files), not of what only a process shows: signals,
kills, what a fresh interpreter imports. What the process would print on its stdout and stderr is captured at
the file-descriptor level (so C-level writes are seen too), Python's default warning filters apply with
warnings printed to stderr as a process prints them, and ``SystemExit`` becomes the return code. Everything
the entry changes in this process is put back: working directory, ``sys.argv``, the environment, Hydra's
global state, the root logger, torch's thread count.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

#: Python's own warning filters for a process started without -W or -X dev (what `python -m runner` gets).
_DEFAULT_FILTERS = [
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, None),
    ("ignore", PendingDeprecationWarning, None),
    ("ignore", ImportWarning, None),
    ("ignore", ResourceWarning, None),
]


class _Output:
    stdout = ""
    stderr = ""


@contextlib.contextmanager
def _captured() -> Iterator[_Output]:
    """fds 1 and 2, and ``sys.stdout``/``sys.stderr``, into two temporary files, for the duration; what was
    written is in the yielded object's ``stdout`` and ``stderr`` afterwards."""
    result = _Output()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds = os.dup(1), os.dup(2)
        saved_sys = sys.stdout, sys.stderr
        out, err = (
            io.TextIOWrapper(open(os.dup(f.fileno()), "wb"), encoding="utf-8", write_through=True)  # noqa: SIM115
            for f in (out_f, err_f)
        )
        try:
            os.dup2(out_f.fileno(), 1)
            os.dup2(err_f.fileno(), 2)
            sys.stdout, sys.stderr = out, err
            yield result
        finally:
            sys.stdout, sys.stderr = saved_sys
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            out.close()
            err.close()
            out_f.seek(0)
            err_f.seek(0)
            result.stdout = out_f.read().decode("utf-8", errors="replace")
            result.stderr = err_f.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def _hydra_state_restored() -> Iterator[None]:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.version import VersionBase

    GlobalHydra.instance().clear()
    hydra_cfg = HydraConfig.instance().cfg
    version_base = VersionBase.instance().version_base
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = hydra_cfg  # a run after this one must not see this run's directory
        VersionBase.instance().version_base = version_base


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


@contextlib.contextmanager
def _torch_threads_restored() -> Iterator[None]:
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and threads is not None:
            torch.set_num_threads(threads)


def run_cli_here(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """What ``tests.conftest.run_cli(args, cwd, env, check=check)`` returns, run in this process."""
    from runner.__main__ import cli

    code = 0
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    with _hydra_state_restored(), _logging_restored(), _torch_threads_restored():
        try:
            os.environ.update(env or {})
            os.chdir(cwd)
            sys.argv = [os.path.join("runner", "__main__.py"), *args]
            with _captured() as output, warnings.catch_warnings():
                warnings.resetwarnings()
                for action, category, module in reversed(_DEFAULT_FILTERS):
                    warnings.filterwarnings(action, category=category, module=module or "")  # type: ignore[arg-type]
                warnings.showwarning = _print_warning
                try:
                    cli()
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    if not isinstance(e.code, int | None):
                        print(e.code, file=sys.stderr)
                except Exception:  # as an uncaught exception ends a process: its traceback, exit 1
                    traceback.print_exc()
                    code = 1
        finally:
            os.chdir(saved_cwd)
            sys.argv = saved_argv
            os.environ.clear()
            os.environ.update(saved_env)
    stdout, stderr = output.stdout, output.stderr
    proc = subprocess.CompletedProcess(["python", "-m", "runner", *args], code, stdout, stderr)
    if check and code != 0:
        raise AssertionError(f"runner {' '.join(args)} exited {code} (in-process)\n{stdout}\n{stderr}")
    return proc


def _print_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
