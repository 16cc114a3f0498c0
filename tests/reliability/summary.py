"""Counts the reliability tests report, printed as one table at the end of the session (see conftest.py).

A row is only counted after its checks passed: a failing case shows up as a pytest failure and is missing
from the "ok" column. Rows not built yet are listed as pending and never counted as passing.
"""

from __future__ import annotations

import json
import os
from collections import Counter

#: row -> (cases attempted, cases that held)
_ATTEMPTED: Counter[str] = Counter()
_HELD: Counter[str] = Counter()

ROWS = [
    "kill trials (SIGKILL at a seeded random instant, then resume)",
    "  killed during a checkpoint save (step_*.tmp present)",
    "  killed during a step / between saves",
    "  no torn checkpoint: all committed verify, resume took the newest",
    "  finished with final weights bitwise identical",
    "corruption cases detected and skipped (local)",
    "fault cases survived (disk full, non-finite loss)",
    "hostile inputs refused",
    "bad configs rejected (exit 2, one line naming key and fix)",
    "kills during an S3 sync (SIGKILL mid-upload, resume, bitwise identical)",
    "corruption cases on S3 detected and skipped (no local copy)",
    "object-store faults survived (unreachable at start/mid-run, errors, slow)",
    "distributed faults (rank dies mid-step, requeued twice)",
]
#: Rows not built yet (listed, never counted as passing).
PENDING: list[str] = []


def attempt(row: str, n: int = 1) -> None:
    _ATTEMPTED[row] += n


def held(row: str, n: int = 1) -> None:
    _HELD[row] += n


def case(row: str) -> None:
    """One case of ``row`` that passed all its checks (call it after the asserts)."""
    attempt(row)
    held(row)


def table() -> str:
    width = max(len(r) for r in ROWS + PENDING) + 2
    lines = [f"{'reliability summary':<{width}}{'cases':>7}{'ok':>7}", "-" * (width + 14)]
    for row in ROWS:
        lines.append(f"{row:<{width}}{_ATTEMPTED[row]:>7}{_HELD[row]:>7}")
    for row in PENDING:
        lines.append(f"{row:<{width}}{'-':>7}{'-':>7}")
    return "\n".join(lines)


def dump() -> None:
    path = os.environ.get("RUNNER_RELIABILITY_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"attempted": dict(_ATTEMPTED), "held": dict(_HELD), "pending": PENDING}, f, indent=1)


def any_recorded() -> bool:
    return bool(_ATTEMPTED)
