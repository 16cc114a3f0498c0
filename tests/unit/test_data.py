"""The image-folder transform: one geometry for both splits; every random choice a function of
(seed, index, epoch)."""

from __future__ import annotations

from pathlib import Path

import torch

from runner.train.data import ImageTransform, imagefolder_splits

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_resize_shows_training_and_evaluation_the_same_image() -> None:
    """The defect of issue 11: evaluation scaled images 1.14x more than training did."""
    resize = ImageTransform(size=16, mean=ZERO, std=ONE)
    image = torch.rand(3, 24, 40)
    assert torch.equal(resize(image, True, gen(1)), resize(image, False, gen(2)))
    assert resize(image, False, gen()).shape == (3, 16, 16)
    same_size = torch.rand(3, 16, 16)
    assert torch.equal(resize(same_size, False, gen()), same_size)  # the input as it is, when it fits


def test_rrc_evaluates_the_centre_crop_and_trains_on_boxes_it_can_draw() -> None:
    rrc = ImageTransform(size=16, mean=ZERO, std=ONE, kind="rrc", eval_crop_pct=0.875)
    assert rrc.box(64, 96, False, gen()) == (4, 20, 56, 56)  # 0.875 of the short side, centred
    fractions = []
    for seed in range(300):
        top, left, h, w = rrc.box(64, 96, True, gen(seed))
        assert 0 <= top <= top + h <= 64 and 0 <= left <= left + w <= 96
        fractions.append(h * w / (64 * 96))
    assert min(fractions) < 0.2 and max(fractions) > 0.8  # spread over rrc_scale=[0.08, 1]
    assert rrc(torch.rand(3, 64, 96), True, gen()).shape == (3, 16, 16)


def test_flip_follows_the_recipe_unless_set(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    common = {"image_size": 8, "num_classes": 2, "num_workers": 0, "train_split": "train", "eval_split": "val"}
    common |= {"mean": [0.0] * 3, "std": [1.0] * 3, "seed": 0}

    def flips(**kwargs: object) -> bool:
        return imagefolder_splits(str(tmp_path), **common, **kwargs).train.transform.flip

    assert not flips(transform="resize") and flips(transform="rrc")
    assert flips(transform="resize", flip=True) and not flips(transform="rrc", flip=False)


def test_samples_depend_on_seed_index_and_epoch_only(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    kwargs = {"image_size": 8, "num_classes": 2, "num_workers": 0, "train_split": "train", "eval_split": "val"}
    kwargs |= {"mean": [0.5] * 3, "std": [0.25] * 3, "seed": 3, "transform": "rrc"}
    first, again = imagefolder_splits(str(tmp_path), **kwargs), imagefolder_splits(str(tmp_path), **kwargs)
    n = len(first.train)
    for index in range(n):
        for epoch in (0, 1):
            assert torch.equal(first.train[(index, epoch)][0], again.train[(index, epoch)][0])
    assert any(not torch.equal(first.train[(i, 0)][0], first.train[(i, 1)][0]) for i in range(n))
    assert torch.equal(first.eval[(0, 0)][0], first.eval[(0, 5)][0])  # evaluation draws nothing


def _write_tree(root: Path) -> None:
    from PIL import Image as pil  # a runner dependency (image-folder decoding)

    noise = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8, generator=noise)
                pil.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")
