"""``python tests/slurm/wait_detached.py <command...>``: run a detached sweep's command, then wait until every
SLURM job the sweep ledgers under the working directory record has ended (per sacct).

Hydra's IntegrationTestSuite reads what the members wrote as soon as the command returns; a detached launch
returns before they run, so the suite's command is wrapped in this (its ``generate_custom_cmd`` hook).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from runner.sweep import ledger

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def main(command: list[str], timeout_s: float = 240) -> int:
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        return code
    ids = [str(r.job_id) for d in Path.cwd().rglob(ledger.LEDGER_DIR) for r in ledger.read(str(d.parent)) if r.job_id]
    if not ids:
        print("wait_detached: the command submitted no SLURM job", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = ledger.sacct_states(ids)
        if len(states) == len(ids) and all(s in ENDED for s, _ in states.values()):
            failed = {job: state for job, (state, _) in states.items() if state != "COMPLETED"}
            if failed:  # the suite would only see a missing output file: say why
                print(f"wait_detached: jobs ended {failed}", file=sys.stderr)
                return 1
            return 0
        time.sleep(0.5)
    print(f"wait_detached: jobs {ids} did not end within {timeout_s:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
