"""Datasets and resumable loaders.

Every random choice (synthetic pixels, crops, flips) is a function of ``(seed, index, epoch)``, not of a
process-global RNG, so data is identical whatever the number of loader workers and after a resume.
The sampler yields ``(index, epoch)`` pairs to make the epoch visible inside worker processes.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
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

#: A region of an image: (top, left, height, width) in pixels.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageTransform:
    """How an image becomes a model input, for both splits: pick a box, resize it to ``size`` x ``size``,
    flip (training only), normalise.

    NOTE: the splits differ only in *which box* they take, never in how it is scaled, so evaluation sees
    images at a scale training produced (the old transform resized evaluation images 1.14x more than training
    ones; a model scoring 92.5% on the plain validation images scored 64%). ``resize`` takes the whole image
    for both; ``rrc`` draws a random-resized crop for training and takes the centred ``eval_crop_pct`` square,
    the typical rrc box, for evaluation. Options: ``data.transform`` and the fields below (conf/data/).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kind: str = "resize"
    flip: bool = False
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (0.75, 1.3333)
    eval_crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.kind not in ("resize", "rrc"):
            raise ValueError(f"data.transform={self.kind!r}: choose one of resize, rrc")

    def box(self, height: int, width: int, train: bool, gen: torch.Generator) -> Box:
        """The region of a ``height`` x ``width`` image that becomes the input."""
        if self.kind == "resize":
            return 0, 0, height, width
        if train:
            return random_resized_box(height, width, self.rrc_scale, self.rrc_ratio, gen)
        side = max(1, round(min(height, width) * self.eval_crop_pct))
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, image: torch.Tensor, train: bool, gen: torch.Generator) -> torch.Tensor:
        """``image``: float (3, H, W) in [0, 1]; every random choice comes from ``gen``."""
        top, left, h, w = self.box(image.shape[-2], image.shape[-1], train, gen)
        image = image[:, top : top + h, left : left + w]
        if (h, w) != (self.size, self.size):
            image = F.interpolate(
                image[None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )[0]
        if train and self.flip and bool(torch.rand((), generator=gen) < 0.5):
            image = image.flip(-1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (image - mean) / std


def random_resized_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> Box:
    """torchvision's ``RandomResizedCrop.get_params`` drawn from ``gen``: area fraction uniform in ``scale``,
    aspect (w/h) log-uniform in ``ratio``; ten tries, then the centred crop with the aspect clamped to ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=gen))
            left = int(torch.randint(width - w + 1, (1,), generator=gen))
            return top, left, h, w
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class ImageFolder(Dataset[Sample]):
    """``<root>/<class>/<image>`` at any fsspec URL, decoded with Pillow, transformed with torch ops."""

    def __init__(
        self,
        root: str,
        transform: ImageTransform,
        train: bool,
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
        self.transform, self.train, self.seed = transform, train, seed

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
        gen = torch.Generator().manual_seed(_mix(self.seed, index, epoch))
        return self.transform(image, self.train, gen), label


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
    transform: str = "resize",
    flip: bool | None = None,
    rrc_scale: Sequence[float] = (0.08, 1.0),
    rrc_ratio: Sequence[float] = (0.75, 1.3333),
    eval_crop_pct: float = 0.875,
) -> Splits:
    base = root.rstrip("/")
    recipe = ImageTransform(
        size=image_size,
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        kind=str(transform),
        flip=str(transform) == "rrc" if flip is None else bool(flip),
        rrc_scale=(float(rrc_scale[0]), float(rrc_scale[1])),
        rrc_ratio=(float(rrc_ratio[0]), float(rrc_ratio[1])),
        eval_crop_pct=float(eval_crop_pct),
    )
    train = ImageFolder(f"{base}/{train_split}", recipe, True, seed)
    if len(train.classes) != num_classes:
        raise ValueError(
            f"data.num_classes={num_classes} but {base}/{train_split} has {len(train.classes)} class folders; "
            f"set data.num_classes={len(train.classes)}"
        )
    if train.fs.exists(f"{train.root.rsplit('/', 1)[0]}/{eval_split}"):
        evaluation: Dataset[Sample] = ImageFolder(f"{base}/{eval_split}", recipe, False, seed, classes=train.classes)
    else:
        log.warning("no %s/%s split: evaluating on the training images", base, eval_split)
        evaluation = ImageFolder(f"{base}/{train_split}", recipe, False, seed, classes=train.classes)
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
        replica: tuple[int, int] = (0, 1),
        num_workers: int = 0,
        pin: bool = False,
    ) -> None:
        """``replica``: (this rank, world size); each rank reads its own share of every epoch."""
        rank, world = replica
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
