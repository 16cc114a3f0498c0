from __future__ import annotations

import json
import random

import numpy as np
import torch

from runner.checkpoint.state import decode, encode, rng_state, set_rng_state


def test_encode_round_trips_through_json() -> None:
    value = {
        "t": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "empty": torch.empty(0),
        "nested": [1, 2.5, None, "x", (3, 4)],
        "arr": np.arange(4, dtype=np.uint32),
    }
    back = decode(json.loads(json.dumps(encode(value))))
    assert torch.equal(back["t"], value["t"]) and back["t"].dtype == torch.int64
    assert torch.equal(back["u8"], value["u8"])
    assert back["empty"].shape == (0,)
    assert back["nested"] == [1, 2.5, None, "x", (3, 4)]
    assert back["arr"].tolist() == [0, 1, 2, 3]


def test_rng_state_restores_every_generator() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = json.loads(json.dumps(encode(rng_state())))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_state(decode(saved))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
