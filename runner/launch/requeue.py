"""Save-then-requeue when SLURM says the job is about to be preempted or to hit its time limit.

submitit installs a handler for the job's signal (USR2 by default) that checkpoints the callable and
requeues the job *from inside the signal handler*, that is, in the middle of whatever step the process
was in, and only on global rank 0 (other ranks just log the signal). Training state cannot be saved from
there: every rank must take part in the checkpoint. So :class:`Preemption` replaces that handler with
one that only sets a flag; the loop reads the flag at its next step boundary (``Hooks.should_stop``),
all ranks agree through a collective and save a checkpoint at the current step, the run closes its
resources (the checkpoint commits, the final storage sync uploads it: see :func:`runner.run.run`), and
then :meth:`Preemption.requeue` has global rank 0 hand over to submitit's original handler, which calls the
launcher's ``checkpoint()`` (it resubmits the same Hydra job into the same run directory) and runs
``scontrol requeue``. The requeued job finds the checkpoint through ``trainer.resume=auto``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

#: Set by a packed job (hydra/launcher=slurm_packed) in each member it runs: on the requeue signal the member
#: saves, then exits with this code, and the pack runs it again (it resumes from that checkpoint).
REQUEUE_EXIT_ENV = "RUNNER_REQUEUE_EXIT"
#: How long a non-zero rank waits for rank 0's requeue to end the job before exiting on its own.
WAIT_FOR_REQUEUE_S = 300.0


#: When the requeue signal came before the run could install its handler (a packed member starting up).
_EARLY: list[float] = []


def catch_early() -> None:
    """In a packed member, first thing: remember a requeue signal that comes before :meth:`Preemption.install`
    (the default action of USR2 would end the member without a checkpoint or a word)."""
    import submitit

    if os.environ.get(REQUEUE_EXIT_ENV):
        signal.signal(submitit.JobEnvironment._usr_sig(), lambda s, f: _EARLY.append(time.monotonic()))


def _is_submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit.")


class Preemption:
    """The requeue signal as a flag, plus what to do once the checkpoint is saved."""

    def __init__(self, signum: int, original: Any, rank: int) -> None:
        self.signum = signum
        self.original = original
        self.rank = rank
        self.received_at: float | None = None

    @classmethod
    def install(cls, rank: int) -> Preemption | None:
        """Take over submitit's requeue signal; None when this process does not run under submitit."""
        try:
            import submitit
        except ImportError:  # pragma: no cover - submitit is a dependency
            return None
        signum = submitit.JobEnvironment._usr_sig()
        original = signal.getsignal(signum)
        if os.environ.get(REQUEUE_EXIT_ENV):  # a member of a packed job: its pack runs it again
            self = cls(signum, None, rank)
            self.received_at = _EARLY[0] if _EARLY else None  # a signal during start-up counts too
            signal.signal(signum, self._on_signal)
            log.info(
                "requeue on %s: save at the next step boundary, then exit for the pack to rerun",
                signal.Signals(signum).name,
            )
            return self
        if not _is_submitit_handler(original):
            return None
        self = cls(signum, original, rank)
        signal.signal(signum, self._on_signal)
        log.info("requeue on %s: save at the next step boundary, then requeue", signal.Signals(signum).name)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # NOTE: only set the flag; the loop saves at its next step boundary (logging here is safe: the
        # handler runs in the main thread between bytecodes, not inside a collective).
        if self.received_at is None:
            self.received_at = time.monotonic()
            log.warning(
                "received %s: will checkpoint at the next step boundary and requeue", signal.Signals(signum).name
            )

    def requested(self) -> bool:
        return self.received_at is not None

    def requeue(self) -> None:
        """Once the checkpoint is committed and synced: rank 0 requeues through submitit; never returns normally.

        Rank 0 exits inside submitit's handler (or raises its ``UncompletedJobError`` when the job has
        been requeued too many times). Other ranks must not report a result (submitit would read an
        unfinished run's return value), so they wait for the requeue to stop them.
        """
        code = os.environ.get(REQUEUE_EXIT_ENV)
        if code:
            log.warning("checkpoint saved; exiting with code %s for the pack to run this member again", code)
            sys.exit(int(code))
        if self.rank == 0:
            log.warning("checkpoint saved; requeueing through submitit")
            self.original(self.signum, None)
            raise SystemExit(-1)  # submitit's handler exits itself; this is only reached if it returned.
        log.warning("checkpoint saved; waiting for rank 0 to requeue the job")
        time.sleep(WAIT_FOR_REQUEUE_S)
        log.error("rank 0 did not requeue the job within %.0fs; exiting", WAIT_FOR_REQUEUE_S)
        sys.exit(1)

    def restore(self) -> None:
        """Give the signal back to submitit (a finished run has nothing left to save)."""
        signal.signal(self.signum, self.original if self.original is not None else signal.SIG_IGN)
