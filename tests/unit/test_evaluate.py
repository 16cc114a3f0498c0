"""Evaluation: a long one shows its progress; a short one stays silent."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from runner.train import loop as train


def _batches(n: int) -> DataLoader:
    data = TensorDataset(torch.randn(4 * n, 3), torch.randint(0, 2, (4 * n,)))
    return DataLoader(data, batch_size=4)


def test_a_long_evaluation_shows_a_progress_bar(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(train, "EVAL_BAR_DELAY_S", 0.0)  # as if each batch took long
    model = torch.nn.Linear(3, 2)
    result = train.evaluate(model, _batches(5), torch.device("cpu"), "fp32", max_batches=3, show_progress=True)
    err = capsys.readouterr().err
    assert "eval:" in err and "/3 [" in err, err  # its total bounded by max_batches
    assert result["top1"] >= 0 and model.training


def test_a_short_evaluation_or_another_rank_prints_nothing(capsys: pytest.CaptureFixture) -> None:
    model = torch.nn.Linear(3, 2)
    train.evaluate(model, _batches(5), torch.device("cpu"), "fp32", max_batches=0, show_progress=True)
    train.evaluate(model, _batches(5), torch.device("cpu"), "fp32", max_batches=0, show_progress=False)
    assert capsys.readouterr().err == ""
