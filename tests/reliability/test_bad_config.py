"""Bad configuration, table-driven: each row exits 2 with one line naming the key and the fix, writes nothing.

tests/integration/test_cli.py checks a few of these for the key only; this table also pins the fix, covers
cross-group combinations, and feeds the reliability summary. Each row runs the entry in this process
(tests/helpers/inproc.py); tests/integration/test_cli.py checks that the process itself exits 2 with one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.inproc import run_cli_here
from tests.reliability import summary
from tests.reliability.conftest import full

ROW = summary.ROWS[8]


def t(*overrides: str) -> list[str]:
    return ["+debug=tiny", *overrides]


# (overrides, key the message must start with, what the message must say to do)
BAD: list[tuple[list[str], str, str]] = [
    # wrong types
    (t("opt.lr=abc"), "opt.lr", r"set opt\.lr to a number"),
    (t("trainer.max_steps=1e3"), "trainer.max_steps", r"set trainer\.max_steps to an integer"),
    (t("trainer.compile=maybe"), "trainer.compile", r"set trainer\.compile to true or false"),
    (t("trainer.max_steps=null"), "trainer.max_steps", r"cannot be null; set trainer\.max_steps"),
    # unknown keys and group options
    (t("trainer.foo=1"), "trainer.foo", r"unknown key; valid keys: max_steps, batch_size"),
    (t("+trainer.lr=0.1"), "trainer.lr", r"unknown key; valid keys: max_steps"),
    (t("+model.foo=1"), "model.foo", r"unknown key; valid keys: image_size"),
    (t("model=nope"), "model=nope", r"no such option; choose one of: .*vit_tiny"),
    (t("sched=linear"), "sched=linear", r"choose one of: const, const_cooldown, cosine"),
    # out of range
    (t("trainer.batch_size=0"), "trainer.batch_size", r"must be >= 1"),
    (t("trainer.grad_accum_steps=0"), "trainer.grad_accum_steps", r"must be >= 1"),
    (t("opt.lr=-0.1"), "opt.lr", r"must be > 0"),
    (t("model.dropout=1.5"), "model.dropout", r"must be in \[0, 1\)"),
    (t("data.num_classes=1"), "data.num_classes", r"must be >= 2"),
    (t("sched.min_lr_ratio=2"), "sched.min_lr_ratio", r"must be in \[0, 1\]"),
    (t("trainer.precision=fp8"), "trainer.precision", r"choose one of fp32, bf16, amp_fp16"),
    (t("trainer.on_nonfinite=ignore"), "trainer.on_nonfinite", r"choose one of stop, skip"),
    (t("trainer.on_save_error=retry"), "trainer.on_save_error", r"choose one of fail, warn"),
    (t("trainer.dist_timeout_s=0"), "trainer.dist_timeout_s", r"must be > 0 seconds"),
    (t("storage.sync_every=often"), "storage.sync_every", r"use seconds or a unit, e\.g\. 90s"),
    (t("trainer.resume="), "trainer.resume", r"must be auto, none or a checkpoint path"),
    (t("opt.betas=[0.9]"), "opt.betas", r"needs two values"),
    (["data=imagefolder"], "data.root", r"set it on the command line"),
    (["data=imagefolder", "data.root=/d", "data.transform=crop"], "data.transform", r"choose one of resize, rrc"),
    (["data=imagefolder", "data.root=/d", "data.rrc_scale=[0.5,0.1]"], "data.rrc_scale", r"0 < low <= high <= 1"),
    # inconsistent combinations
    (t("opt=sgd", "opt.nesterov=true", "opt.momentum=0"), "opt.nesterov", r"needs opt\.momentum > 0"),
    (t("model.heads=5"), "model.width", r"choose a model\.heads that divides it"),
    (t("model.patch_size=5"), "model.image_size", r"choose a model\.patch_size that divides it"),
    (t("trainer.batch_size=300"), "trainer.batch_size", r"larger than data\.train_size=256; lower trainer\.batch_size"),
    (t("trainer.device=cuda"), "trainer.device", r"use trainer\.device=cpu"),
    (t("data=imagefolder", "data.root=/data"), "data.train_size", r"unknown key; valid keys: image_size"),
]


def test_the_table_is_big_enough() -> None:
    assert len(BAD) >= 20
    assert len({tuple(o) for o, _, _ in BAD}) == len(BAD), "duplicate rows"


# The fast suite (default `nox` tests) runs every other row; `nox -s reliability` runs them all.
RUN = BAD if full() else BAD[::2]


@pytest.mark.parametrize(("overrides", "key", "fix"), RUN, ids=[" ".join(o) for o, _, _ in RUN])
def test_bad_config_exits_2_naming_key_and_fix(tmp_path: Path, overrides: list[str], key: str, fix: str) -> None:
    proc = run_cli_here(overrides, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {key}"), lines[0]
    assert re.search(fix, lines[0]), f"no fix in: {lines[0]}"
    assert list(tmp_path.iterdir()) == [], "a rejected run left files behind"
    summary.case(ROW)
