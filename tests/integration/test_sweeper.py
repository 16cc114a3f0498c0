"""The default sweeper (hydra_plugins/runner_sweeper): same verdicts as Hydra's basic sweeper, cheaper.

Every sweep runs twice, with ``hydra/sweeper=basic`` (Hydra's own, which composes every member) and with
the default: the exit code and the reason in the error line must be the same (the default also names the
member). Members are dry runs
(``trainer.max_steps=0``), so a sweep that passes validation costs about a second; each runs in this process
(tests/helpers/inproc.py), as nothing here needs a process of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.inproc import run_cli_here

SWEEPS = {
    "values and group options": ["trainer.seed=range(3)", "model=vit_tiny,vits16"],
    "an added preset": ["+debug=tiny", "opt=adamw,sgd", "opt.lr=0.1,0.01"],
    "a value of the wrong type": ["opt.lr=0.1,abc"],
    "an unknown group option": ["model=vit_tiny,nope"],
    "a key only some group options have": ["data=synthetic,imagefolder", "data.root=/x"],
    "an unknown key": ["trainer.seed=1,2", "trainer.nope=3"],
}


def sweep(cwd: Path, args: list[str], basic: bool) -> tuple[int, str, str]:
    extra = ["hydra/sweeper=basic"] if basic else []
    proc = run_cli_here(["-m", "trainer.max_steps=0", *extra, *args], cwd, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return proc.returncode, errors[-1] if errors else "", proc.stdout + proc.stderr


@pytest.mark.parametrize("args", list(SWEEPS.values()), ids=list(SWEEPS))
def test_same_verdict_as_hydras_basic_sweeper(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "basic").mkdir()
    (tmp_path / "runner").mkdir()
    want_code, want_error, _ = sweep(tmp_path / "basic", args, basic=True)
    code, error, output = sweep(tmp_path / "runner", args, basic=False)
    assert code == want_code, output
    # The same reason (runner's sweeper also names the member, when a member's own values are the cause).
    assert want_error.removeprefix("error: ") in error, output
    if code == 0:
        assert "dry run" in output
    else:
        assert code == 2 and error, output
        assert "dry run" not in output, "a member was launched before the sweep was validated"
        assert list((tmp_path / "runner").iterdir()) == [], "a rejected sweep left files behind"
