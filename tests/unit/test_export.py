"""``python -m runner.export``: a checkpoint's model weights as one standard file, verified first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runner import export
from runner.checkpoint.load import read_tensors
from runner.checkpoint.save import Checkpointer
from tests.helpers.state import make_state, train_steps


def _checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = make_state()
    train_steps(state, 3)
    folder = Path(Checkpointer(str(tmp_path / "run"), keep_latest_k=2, config_hash="x").save(state))
    return folder, {k: v.detach().clone() for k, v in state.model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_export_writes_exactly_the_saved_weights(tmp_path: Path, fmt: str) -> None:
    folder, weights = _checkpoint(tmp_path)
    out = tmp_path / f"model.{fmt}"
    assert export.main([str(folder), str(out), "--format", fmt]) == 0
    if fmt == "safetensors":
        from safetensors.torch import load_file

        got = load_file(str(out))
    else:
        got = torch.load(out, weights_only=True)
    assert got.keys() == weights.keys()
    assert all(torch.equal(got[k], weights[k]) for k in weights)
    saved = read_tensors(str(folder), prefix="model.")
    assert {f"model.{k}" for k in got} == set(saved)
    # And it loads into the model class as it is.
    model = make_state(init_seed=1).model
    model.load_state_dict(got)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_a_damaged_checkpoint_is_refused_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, _ = _checkpoint(tmp_path)
    data = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = tmp_path / "model.safetensors"
    assert export.main([str(folder), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{data.name} fails its checksum" in err and err.count("\n") == 1, err
    assert not out.exists() and not Path(f"{out}.tmp").exists()


def test_bad_arguments_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, _ = _checkpoint(tmp_path)
    assert export.main([str(folder), str(tmp_path / "nowhere" / "m.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert export.main([str(tmp_path / "run" / "checkpoints" / "step_9"), str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert "no such checkpoint" in err and "trainer.resume" not in err, err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 3
