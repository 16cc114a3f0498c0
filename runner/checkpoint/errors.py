"""What can go wrong with a checkpoint, as exceptions the entry point reports in one line (exit 1)."""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or one named explicitly cannot be loaded."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks to unpickle something outside the allow-list: refused."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files do not match its manifest. Found while loading, it means the destination was
    partly overwritten with the checkpoint's bytes and must not be used as it is."""


def one_line(error: BaseException) -> str:
    """``OSError: [Errno 28] No space left on device`` rather than DCP's multi-line report of it.

    NOTE: torch's zip writer turns a failed write into ``RuntimeError: unexpected pos``; the OS error that
    says what to fix is further down the chain (and, with DCP, inside ``CheckpointException.failures``).
    """
    roots: list[BaseException] = [error]
    if isinstance(error, CheckpointException):
        roots += [f[0] if isinstance(f, tuple) else f for f in error.failures.values()]
    for root in roots:
        seen: BaseException | None = root
        for _ in range(20):  # a chain, not a cycle
            if seen is None:
                break
            if isinstance(seen, OSError) and seen.errno is not None:
                return f"{type(seen).__name__}: [Errno {seen.errno}] {seen.strerror}"
            seen = seen.__cause__ or seen.__context__
    text = f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text
