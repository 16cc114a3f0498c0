"""Datasets and resumable loaders.

Every random choice (synthetic pixels, crops, flips) is a function of ``(seed, index, epoch)``, not of a
process-global RNG, so data is identical whatever the number of loader workers and after a resume.
The sampler yields ``(index, epoch)`` pairs to make the epoch visible inside worker processes.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

log = logging.getLogger(__name__)

# torchdata 0.11 calls a deprecated torch API on every loader; the warning says nothing to our users.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

Sample = tuple[torch.Tensor, int]


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 finaliser)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SyntheticImages(Dataset[Sample]):
    """Images of class-specific smooth patterns plus noise: learnable, and deterministic per index."""

    def __init__(self, size: int, image_size: int, num_classes: int, noise: float, seed: int, split: int) -> None:
        self.size, self.image_size, self.num_classes, self.noise = size, image_size, num_classes, noise
        self.seed, self.split = seed, split
        gen = torch.Generator().manual_seed(_mix(seed, 7919))
        coarse = torch.randn(num_classes, 3, 4, 4, generator=gen)
        self.templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int] | int) -> Sample:
        index = key[0] if isinstance(key, tuple) else key
        gen = torch.Generator().manual_seed(_mix(self.seed, self.split, index))
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        noise = torch.randn(3, self.image_size, self.image_size, generator=gen)
        return self.templates[label] + self.noise * noise, label


@dataclass
class Splits:
    train: Dataset[Sample]
    eval: Dataset[Sample]
    num_classes: int
    num_workers: int


def synthetic_splits(
    image_size: int,
    num_classes: int,
    num_workers: int,
    train_size: int,
    eval_size: int,
    noise: float,
    seed: int,
) -> Splits:
    return Splits(
        train=SyntheticImages(train_size, image_size, num_classes, noise, seed, split=0),
        eval=SyntheticImages(eval_size, image_size, num_classes, noise, seed, split=1),
        num_classes=num_classes,
        num_workers=num_workers,
    )


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolder(Dataset[Sample]):
    """``<root>/<class>/<image>`` at any fsspec URL, decoded with Pillow, transformed with torch ops."""

    def __init__(
        self,
        root: str,
        image_size: int,
        train: bool,
        mean: list[float],
        std: list[float],
        seed: int,
        classes: list[str] | None = None,
    ) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")
        files = sorted(p for p in self.fs.find(self.root) if p.lower().endswith(_IMAGE_EXTS))
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(_IMAGE_EXTS)}) under {root}")
        self.classes = classes or sorted({p[len(self.root) + 1 :].split("/")[0] for p in files})
        index = {name: i for i, name in enumerate(self.classes)}
        self.items = [(p, index[p[len(self.root) + 1 :].split("/")[0]]) for p in files]
        self.image_size, self.train, self.seed = image_size, train, seed
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int] | int) -> Sample:
        from PIL import Image

        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.items[index]
        with self.fs.open(path, "rb") as f, Image.open(io.BytesIO(f.read())) as img:
            rgb = img.convert("RGB")
            pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            image = pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float().div_(255)
        image = self._transform(image, torch.Generator().manual_seed(_mix(self.seed, index, epoch)))
        return (image - self.mean) / self.std, label

    def _transform(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        size = self.image_size
        short = min(image.shape[-2:])
        scale = (size * (1.0 if self.train else 1.14)) / short
        new_hw = [max(size, round(d * scale)) for d in image.shape[-2:]]
        image = F.interpolate(image[None], size=new_hw, mode="bilinear", antialias=True, align_corners=False)[0]
        h, w = image.shape[-2:]
        if self.train:
            top = int(torch.randint(h - size + 1, (1,), generator=gen))
            left = int(torch.randint(w - size + 1, (1,), generator=gen))
        else:
            top, left = (h - size) // 2, (w - size) // 2
        image = image[:, top : top + size, left : left + size]
        if self.train and bool(torch.rand((), generator=gen) < 0.5):
            image = image.flip(-1)
        return image


def imagefolder_splits(
    root: str,
    image_size: int,
    num_classes: int,
    num_workers: int,
    train_split: str,
    eval_split: str,
    mean: list[float],
    std: list[float],
    seed: int,
) -> Splits:
    base = root.rstrip("/")
    train = ImageFolder(f"{base}/{train_split}", image_size, True, mean, std, seed)
    if len(train.classes) != num_classes:
        raise ValueError(
            f"data.num_classes={num_classes} but {base}/{train_split} has {len(train.classes)} class folders; "
            f"set data.num_classes={len(train.classes)}"
        )
    if train.fs.exists(f"{train.root.rsplit('/', 1)[0]}/{eval_split}"):
        evaluation: Dataset[Sample] = ImageFolder(
            f"{base}/{eval_split}", image_size, False, mean, std, seed, classes=train.classes
        )
    else:
        log.warning("no %s/%s split: evaluating on the training images", base, eval_split)
        evaluation = ImageFolder(f"{base}/{train_split}", image_size, False, mean, std, seed, classes=train.classes)
    return Splits(train=train, eval=evaluation, num_classes=num_classes, num_workers=num_workers)


class EpochSampler(StatefulDistributedSampler):
    """A resumable distributed sampler that yields ``(index, epoch)`` so augmentation can depend on the epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in super().__iter__():
            yield index, self.epoch


class TrainStream:
    """An endless, resumable stream of training batches over epochs."""

    def __init__(
        self,
        dataset: Dataset[Sample],
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        num_workers: int,
        pin: bool,
    ) -> None:
        self.sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.loader = StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=pin,
            persistent_workers=False,
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"trainer.batch_size={batch_size} is larger than the {len(dataset)} training samples per rank; "  # type: ignore[arg-type]
                "lower trainer.batch_size or use more data"
            )
        self.epoch = 0
        self._it: Iterator[Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.sampler.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._it = None

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.sampler.set_epoch(self.epoch)


def eval_loader(
    dataset: Dataset[Sample], batch_size: int, rank: int, world: int, num_workers: int
) -> StatefulDataLoader:
    sampler = StatefulDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
