"""Issue 14 with the local pool launcher: the members' ledger, and retry-failed relaunching only the failed one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runner.sweep import ledger
from tests.conftest import TINY, cli_env, run_cli

pytestmark = pytest.mark.slow


def test_pool_sweep_ledger_and_retry_failed(tmp_path: Path) -> None:
    args = ["-m", "hydra/launcher=pool", "hydra.launcher.slots=2", "opt.lr=1e-3,1e30", *TINY]
    assert run_cli(args, tmp_path, timeout=240, check=False).returncode == 1  # member #1 diverges
    (sweep_dir,) = tmp_path.glob("multirun/*")
    ok, bad = ledger.read(str(sweep_dir))
    assert (ok.state, ok.step, ok.total, ok.index, ok.attempts) == ("COMPLETED", 6, 6, 0, 1)
    assert ok.objective is not None and ok.name == "debug=tiny,opt.lr=0.001" and ok.config_hash
    assert (bad.state, bad.index, bad.exit_reason) == ("FAILED", 1, "RunStopped")
    assert bad.error is not None and bad.error.startswith("non-finite loss or gradients at step")
    assert bad.log_path is not None and "non-finite loss" in Path(bad.log_path).read_text()

    retry = subprocess.run(
        [sys.executable, "-m", "runner.sweep", "retry-failed", str(sweep_dir)],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert "retry-failed: resubmitting 1 member(s)" in retry.stdout, retry.stdout + retry.stderr
    assert retry.returncode == 1  # it diverges again, and says so
    again_ok, again_bad = ledger.read(str(sweep_dir))
    assert again_ok.attempts == 1 and again_ok.state == "COMPLETED"  # not relaunched
    assert again_bad.attempts == 2 and again_bad.state == "FAILED"
    assert sorted(p.name for p in tmp_path.glob("multirun/*")) == [sweep_dir.name]  # the same sweep directory
