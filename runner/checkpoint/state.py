"""What a checkpoint holds, named in one place.

The payload splits in two: tensors (model weights, optimizer moments) go to torch.distributed.checkpoint;
everything else (step, RNG states, data position, scaler, optimizer hyper-parameters) goes to one JSON
file per rank. Neither half is ever unpickled on load. Tensors met on the JSON side (RNG states, loader
state) are encoded as raw bytes + dtype + shape and rebuilt with ``torch.frombuffer``.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

# Keys of the tensor payload (DCP) and of the per-rank JSON payload.
MODEL = "model"
OPTIM = "optim"
STEP = "step"
DATA = "data"
RNG = "rng"
SCALER = "scaler"
SCHED = "sched"
OPTIM_META = "optim_meta"
WINDOW = "window"
LAST_EVAL = "last_eval"
SKIPPED = "skipped_steps"

_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"


def encode(obj: Any) -> Any:
    """JSON-safe copy of ``obj``: tensors and numpy arrays as tagged bytes, tuples tagged."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {
            _TENSOR_TAG: {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "b64": base64.b64encode(raw).decode(),
            }
        }
    if isinstance(obj, np.ndarray):
        return encode(torch.from_numpy(obj.copy()))
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE_TAG: [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON state")


def decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _TENSOR_TAG in obj and len(obj) == 1:
            spec = obj[_TENSOR_TAG]
            dtype = getattr(torch, str(spec["dtype"]))
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"not a dtype: {spec['dtype']!r}")
            raw = bytearray(base64.b64decode(spec["b64"]))
            if not raw:
                return torch.empty([int(d) for d in spec["shape"]], dtype=dtype)
            return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape([int(d) for d in spec["shape"]])
        if _TUPLE_TAG in obj and len(obj) == 1:
            return tuple(decode(v) for v in obj[_TUPLE_TAG])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def split_tensors(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors out of a nested dict (keyed by dotted path) and the rest with placeholders."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {"__dcp__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            items = [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    return tensors, walk(obj, prefix)


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__dcp__"}:
            return tensors[skeleton["__dcp__"]]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        items = [join_tensors(v, tensors) for v in skeleton]
        return items if isinstance(skeleton, list) else tuple(items)
    return skeleton


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class Payload(Protocol):
    """What a checkpoint write needs: a live ``TrainState`` or a CPU snapshot of one (async saves)."""

    @property
    def step(self) -> int: ...

    def tensors_and_meta(self) -> tuple[dict[str, Any], dict[str, Any]]: ...


@dataclass
class TrainState:
    """Everything a bitwise-identical continuation needs. The loop mutates ``step`` and ``window``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Any  # runner.train.data.TrainStream (kept loose to avoid an import cycle)
    scaler: torch.amp.GradScaler | None = None
    sched: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    # Running sums of the current logging window (loss sum, step count), so a resumed run logs the same values.
    window: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    # Steps whose update was skipped for a non-finite loss or gradient (trainer.on_nonfinite=skip).
    skipped_steps: int = 0

    _OPTS = StateDictOptions(full_state_dict=False)

    def tensors_and_meta(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensor payload for DCP, JSON-able payload for this rank)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._OPTS)
        optim_tensors, optim_meta = split_tensors(optim_sd, OPTIM)
        tensors = {MODEL: model_sd, OPTIM: _nest(optim_tensors, OPTIM)}
        meta = {
            STEP: self.step,
            DATA: self.data.state_dict(),
            RNG: rng_state(),
            SCALER: self.scaler.state_dict() if self.scaler is not None else None,
            SCHED: self.sched,
            OPTIM_META: optim_meta,
            WINDOW: self.window,
            LAST_EVAL: self.last_eval,
            SKIPPED: self.skipped_steps,
        }
        return tensors, encode(meta)

    def load_destination(self) -> dict[str, Any]:
        """Live tensors of the right shapes for DCP to load into (optimizer state materialised)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._OPTS)
        optim_tensors, _ = split_tensors(optim_sd, OPTIM)
        return {MODEL: model_sd, OPTIM: _nest(optim_tensors, OPTIM)}

    def restore(self, loaded: dict[str, Any], meta_json: dict[str, Any]) -> None:
        meta = decode(meta_json)
        flat_optim = _flatten(loaded[OPTIM], OPTIM)
        optim_sd = join_tensors(meta[OPTIM_META], flat_optim)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=loaded[MODEL],
            optim_state_dict=optim_sd,
            options=self._OPTS,
        )
        self.step = int(meta[STEP])
        self.data.load_state_dict(meta[DATA])
        set_rng_state(meta[RNG])
        if self.scaler is not None and meta[SCALER] is not None:
            self.scaler.load_state_dict(meta[SCALER])
        self.sched = meta[SCHED]
        self.window = meta[WINDOW]
        self.last_eval = meta[LAST_EVAL]
        self.skipped_steps = int(meta.get(SKIPPED, 0))  # absent in checkpoints written before it existed


def _nest(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Strip ``prefix.`` from flat keys (DCP flattens nested dicts itself)."""
    return {k[len(prefix) + 1 :]: v for k, v in flat.items()}


def _flatten(nested: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in nested.items()}
