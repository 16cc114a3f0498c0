"""The real command line: bad input exits 2 with one line and leaves nothing behind; help and --cfg.

Most cases run the entry in this process (tests/helpers/inproc.py: the same ``cli()``, output captured at the
file descriptors, ``SystemExit`` as the exit code); what only a new interpreter shows runs as a subprocess:
that the process itself exits 2 with one line, and which modules a dry run imports.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.helpers.inproc import run_cli_here

BAD = [
    ("opt.lr=abc", "opt.lr"),
    ("model=nope", "model=nope"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.keep_latest_k=0", "trainer.keep_latest_k"),
    ("opt.lr=-0.1", "opt.lr"),
    ("trainer.foo=1", "trainer.foo"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("name=../../escape", "name"),
    ("storage.sync_every=often", "storage.sync_every"),
    ("data=imagefolder", "data.root"),
]


@pytest.mark.parametrize(("override", "key"), BAD)
def test_bad_config_exits_2_with_one_line_and_no_run_dir(workdir: Path, override: str, key: str) -> None:
    proc = run_cli_here([override], cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and key in lines[0], lines[0]
    assert list(workdir.iterdir()) == [], "a rejected run left files behind"


def test_max_steps_zero_validates_without_torch_and_leaves_nothing(workdir: Path) -> None:
    proc = run_cli(["trainer.max_steps=0"], cwd=workdir, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert "dry run" in proc.stdout
    assert not re.search(r"\| torch$", proc.stderr, re.MULTILINE), "a dry run imported torch"
    assert list(workdir.iterdir()) == []
    # Still a validation: a bad value fails as it would for a real run. (And the process itself exits 2 with
    # one line, leaving nothing: the in-process cases above see SystemExit(2) and the captured output.)
    bad = run_cli(["trainer.max_steps=0", "opt.lr=-1"], cwd=workdir, check=False)
    assert bad.returncode == 2 and "opt.lr" in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.strip()] == [bad.stderr.strip()], bad.stderr
    assert bad.stderr.startswith("error: opt.lr") and list(workdir.iterdir()) == []


def test_a_bad_image_transform_names_the_value_and_the_choices(workdir: Path) -> None:
    """The recipe is validated before torch is imported, as every other choice is."""
    folder = ["data=imagefolder", "data.root=/nowhere", "data.num_classes=3"]
    proc = run_cli_here([*folder, "data.transform=crop"], cwd=workdir, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == ["error: data.transform: unknown value 'crop'; choose one of resize, rrc"]
    bad_range = run_cli_here([*folder, "data.transform=rrc", "data.eval_crop_pct=1.5"], cwd=workdir, check=False)
    assert bad_range.returncode == 2 and "error: data.eval_crop_pct: must be in (0, 1]" in bad_range.stderr
    assert list(workdir.iterdir()) == []
    ok = run_cli(
        [*folder, "data.transform=rrc", "trainer.max_steps=0"], cwd=workdir, env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert "dry run" in ok.stdout and not re.search(r"\| torch$", ok.stderr, re.MULTILINE)


def test_unknown_option_lists_the_choices(workdir: Path) -> None:
    proc = run_cli_here(["model=nope"], cwd=workdir, check=False)
    assert "vit_tiny" in proc.stderr and "vitb16" in proc.stderr


def test_cfg_job_prints_the_composed_config(workdir: Path) -> None:
    proc = run_cli_here(["--cfg", "job", "model=vitb16"], cwd=workdir)
    for group in ("model:", "opt:", "sched:", "data:", "storage:", "trainer:"):
        assert group in proc.stdout
    assert "width: 768" in proc.stdout
    assert list(workdir.iterdir()) == []


def test_help_lists_groups_and_options(workdir: Path) -> None:
    proc = run_cli_here(["--help"], cwd=workdir)
    for text in ("model:", "vitb16", "opt:", "sgd", "sched:", "const_cooldown", "data:", "imagefolder", "storage:"):
        assert text in proc.stdout, text
    groups = proc.stdout.split("== Config groups ==")[1].split("== Config ==")[0]
    assert "hydra/launcher: basic, local, pool, slurm" in groups, groups
    assert "schema" not in groups, groups  # the typed schemas behind the YAML are not options to choose
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    "overrides",
    [
        # a package that is not installed (runner does not depend on torchvision)
        ["model=custom", "model._target_=torchvision.models.resnet18", "+model.num_classes=10"],
        # an installed package without that name: found only when the run imports it
        ["model=custom", "model._target_=torch.nn.NoSuchLayer"],
    ],
)
def test_an_unimportable_target_is_one_line_exit_2_and_nothing_written(workdir: Path, overrides: list[str]) -> None:
    proc = run_cli_here([*overrides, "+debug=tiny"], cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model._target_"), proc.stderr
    target = overrides[1].split("=", 1)[1]
    assert target in lines[0] and target.rsplit(".", 1)[0].split(".")[-1] in lines[0], lines[0]
    assert list(workdir.iterdir()) == [], "a rejected run left files behind"


@pytest.mark.parametrize("launcher", ["basic", "pool", "local", "slurm"])
@pytest.mark.parametrize(
    ("sweep", "bad"),
    [
        ("trainer.batch_size=8,0", "trainer.batch_size"),
        ("opt.lr=1e-3,-1", "opt.lr"),
        ("trainer.precision=fp32,fp16", "trainer.precision"),
    ],
)
def test_a_sweep_validates_every_member_before_launching_any(
    workdir: Path, launcher: str, sweep: str, bad: str
) -> None:
    """Value checks (ranges, choices, combinations) run for every member up front, whatever the launcher: the
    valid member 0 is not trained, and nothing is written. (SLURM: rejected before anything is submitted.)"""
    proc = run_cli_here(["-m", f"hydra/launcher={launcher}", sweep, "+debug=tiny"], cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sweep member #1 ") and bad in lines[0], proc.stderr
    assert "launch" not in proc.stdout.lower(), proc.stdout
    assert list(workdir.iterdir()) == [], "a rejected sweep left files behind"


def test_resume_from_a_path_that_does_not_exist_says_so(workdir: Path) -> None:
    proc = run_cli_here(["+debug=tiny", f"trainer.resume={workdir / 'nowhere' / 'step_5'}"], cwd=workdir, check=False)
    assert proc.returncode == 1
    assert "no such checkpoint" in proc.stderr and "manifest" not in proc.stderr, proc.stderr


def test_vitb16_runs_two_steps_and_reports_its_size(workdir: Path) -> None:
    proc = run_cli_here(
        [
            "model=vitb16",
            "opt=adamw",
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "data.image_size=64",
            "data.train_size=8",
            "data.eval_size=4",
            "trainer.eval_batches=1",
            "trainer.ckpt_every=100",
        ],
        cwd=workdir,
    )
    found = re.search(r"([\d.]+)M parameters", proc.stdout + proc.stderr)
    assert found is not None and 85 < float(found.group(1)) < 87, proc.stdout[-2000:]
