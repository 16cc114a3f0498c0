"""A real image dataset as an ImageFolder tree, and the two trainers the image-folder comparison runs on it.

scikit-learn's ``load_digits`` (1,797 8x8 greyscale digits, 10 classes: a real scanned dataset that ships
with the package, no download) is written as ``<root>/train/<class>/<n>.png`` and ``<root>/val/<class>/<n>.png``
(80/20, a fixed permutation), upscaled to the model's input size. :func:`bare_top1` is the hand-written loop
a user would write for it; :func:`runner_top1` is ``python -m runner data=imagefolder`` run in this process
with runner's default data settings. Used by tests/integration/test_imagefolder.py and bench/imagefolder.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Fraction of the images held out for evaluation.
VAL_FRACTION = 0.2
CLASSES = 10


@dataclass(frozen=True)
class Recipe:
    """What both trainers share: model (runner's ``vit_tiny`` shape unless told), AdamW, the cosine schedule
    with warmup, batch, steps and input size."""

    image_size: int = 32
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    batch_size: int = 64
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip_norm: float = 1.0
    seed: int = 0
    threads: int = 1

    def overrides(self) -> list[str]:
        """The same recipe as runner overrides (everything else: runner's defaults, data settings included)."""
        return [
            f"data.image_size={self.image_size}",
            f"model.patch_size={self.patch_size}",
            f"model.width={self.width}",
            f"model.depth={self.depth}",
            f"model.heads={self.heads}",
            f"trainer.batch_size={self.batch_size}",
            f"trainer.max_steps={self.steps}",
            f"opt.lr={self.lr}",
            f"opt.weight_decay={self.weight_decay}",
            f"sched.warmup_steps={self.warmup_steps}",
            f"trainer.grad_clip_norm={self.grad_clip_norm}",
            f"trainer.seed={self.seed}",
            f"trainer.threads={self.threads}",
        ]


def write_digits(root: str | os.PathLike[str], image_size: int = 32, seed: int = 0) -> tuple[int, int]:
    """Write the digits as PNGs under ``root/train`` and ``root/val``; returns (train, val) image counts."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    n_val = round(len(order) * VAL_FRACTION)
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = Path(root, split, str(int(digits.target[i])))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16
        image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
        image.save(folder / f"{int(i):04d}.png")
    return len(order) - n_val, n_val


def _load(folder: Path) -> tuple[object, object]:
    """Every image under ``folder/<class>/`` as one normalised float tensor, with its labels."""
    import torch
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images, labels = [], []
    for label in range(CLASSES):
        for path in sorted((folder / str(label)).glob("*.png")):
            with Image.open(path) as img:
                rgb = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
                pixels = rgb.view(img.height, img.width, 3).permute(2, 0, 1).float() / 255
            images.append((pixels - mean) / std)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def bare_top1(root: str | os.PathLike[str], recipe: Recipe) -> float:
    """The hand-written loop: the images as they are, shuffled batches, no augmentation; held-out top-1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _bare_top1(Path(root), recipe)
    finally:
        torch.set_num_threads(threads)


def _bare_top1(root: Path, recipe: Recipe) -> float:
    import torch
    import torch.nn.functional as F

    from runner.models.vit import VisionTransformer
    from runner.train.optim import CosineSchedule, param_groups

    torch.manual_seed(recipe.seed)
    train_x, train_y = _load(Path(root, "train"))
    val_x, val_y = _load(Path(root, "val"))
    model = VisionTransformer(
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        num_classes=CLASSES,
        width=recipe.width,
        depth=recipe.depth,
        heads=recipe.heads,
    )
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr)
    lr_at = CosineSchedule(base_lr=recipe.lr, total_steps=recipe.steps, warmup_steps=recipe.warmup_steps)
    order = torch.Generator().manual_seed(recipe.seed)
    step = 0
    while step < recipe.steps:
        perm = torch.randperm(len(train_y), generator=order)  # type: ignore[arg-type]
        for start in range(0, len(perm) - recipe.batch_size + 1, recipe.batch_size):
            batch = perm[start : start + recipe.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])  # type: ignore[index]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == recipe.steps:
                break
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(1) for chunk in val_x.split(256)])  # type: ignore[attr-defined]
    return float((predicted == val_y).float().mean())


def runner_top1(root: str | os.PathLike[str], recipe: Recipe, workdir: str | os.PathLike[str], *extra: str) -> float:
    """``python -m runner data=imagefolder`` in this process (runner's data defaults); the final eval top-1.

    ``data.num_workers=0`` only because loader processes cost more than they save on 1,437 small PNGs:
    the data are the same whatever the worker count (runner/train/data.py).
    """
    from hydra import compose, initialize_config_dir

    from runner.__main__ import CONFIG_DIR, train
    from runner.config import install

    install()
    overrides = [
        "name=digits",
        "data=imagefolder",
        f"data.root={root}",
        f"data.num_classes={CLASSES}",
        "data.num_workers=0",
        *recipe.overrides(),
        f"trainer.ckpt_every={recipe.steps}",
        "trainer.resume=none",
        *extra,
    ]
    with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    import torch

    here, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(workdir)  # the run directory is outputs/<name> under the working directory
    try:
        return train(cfg)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)  # trainer.threads sets it for the whole process
