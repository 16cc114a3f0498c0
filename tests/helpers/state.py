"""Small training states for checkpoint tests, and what a hostile checkpoint is made of."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from runner.checkpoint.layout import MANIFEST
from runner.checkpoint.state import TrainState
from runner.models.vit import VisionTransformer
from runner.storage.local import sha256_file
from runner.train.data import SyntheticImages, TrainStream
from runner.train.optim import param_groups


def make_state(init_seed: int = 0) -> TrainState:
    """Same data config every time; ``init_seed`` only changes the model's initial weights."""
    seed = 0
    torch.manual_seed(init_seed)
    model = VisionTransformer(image_size=16, patch_size=8, num_classes=4, width=16, depth=1, heads=2)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    data = TrainStream(SyntheticImages(64, 16, 4, 1.0, seed, 0), 8, seed)
    return TrainState(model, opt, data)


def train_steps(state: TrainState, n: int) -> None:
    for _ in range(n):
        x, y = next(state.data)
        loss = torch.nn.functional.cross_entropy(state.model(x), y)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.step += 1


def tensors_of(state: TrainState) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    for i, (k, v) in enumerate(state.optimizer.state_dict()["state"].items()):
        for name, t in v.items():
            out[f"optim.{i}.{k}.{name}"] = t
    return out


class Payload:
    """Runs a command when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def rewrite_manifest(path: str) -> None:
    """What an attacker does: make the manifest agree with the tampered files."""
    manifest = json.loads(Path(path, MANIFEST).read_text())
    manifest["files"] = {}
    for name in os.listdir(path):
        if name != MANIFEST:
            manifest["files"][name] = {
                "size": os.path.getsize(os.path.join(path, name)),
                "checksum": sha256_file(os.path.join(path, name)),
            }
    Path(path, MANIFEST).write_text(json.dumps(manifest))
