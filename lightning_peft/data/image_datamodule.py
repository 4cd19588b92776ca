"""A LightningDataModule for image classification: load, split by class, resize and normalise per batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .datasets import stratified_split
from .images import ImageDataset, load_image_dataset
from .labels import check_model_classes, model_num_classes

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageClassificationDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Images(torch.utils.data.Dataset):
    def __init__(self, data: ImageDataset, augment: Any = None) -> None:
        self.images = data.images
        self.labels = data.labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.augment is not None:
            image = self.augment(image)
        return image, self.labels[i]


def balanced_prefix(indices: list[int], labels: Sequence[int], n: int | None) -> list[int]:
    """The first ``n`` of ``indices`` taken round-robin over classes (each class in its given order): as balanced as ``n`` allows."""
    if n is None:
        return list(indices)
    per_class: dict[int, list[int]] = {}
    for i in indices:
        per_class.setdefault(labels[i], []).append(i)
    queues = [per_class[c] for c in sorted(per_class)]
    out: list[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        out.extend(q[rank] for q in queues if rank < len(q))
    return out[:n]


class ImageClassificationDataModule(pl.LightningDataModule):
    """Train/validation loaders of images, split reproducibly and stratified by class.

    Batches are dicts ``{"pixel_values": (batch, channels, image_size, image_size) float,
    "labels": (batch,)}``: images are scaled to [0, 1], resized (bilinear) to ``image_size``, grey
    images repeated to ``channels`` channels, then normalised with ``mean``/``std`` (ImageNet's by
    default, as the pretrained backbones expect). With ``augment=True`` training images get a light
    random affine transform (rotation ±10°, shift ±10%, scale 0.9–1.1) before resizing; validation
    images never do. Random draws follow the global seed (``seed_everything``).

    Args:
        dataset: registered image data set name (``mnist5k``).
        image_size: side of the square images fed to the model (pixels).
        channels: channels of the model's input (grey images are repeated to fill them).
        batch_size: examples per batch (validation uses the same).
        val_fraction: share of each class held out for validation.
        train_size / val_size: optionally keep only this many examples (after the split), spread over
            the classes as evenly as possible, for quick runs.
        split_seed: seed of the split and subsampling (independent of the training seed).
        num_workers: DataLoader workers.
        augment: light random affine augmentation of training images.
        mean / std: per-channel normalisation (``channels`` values each).
        dataset_kwargs: passed to the data set loader (e.g. ``path``).

    Example:
        >>> dm = ImageClassificationDataModule(image_size=32, batch_size=4, train_size=20, val_size=10)  # doctest: +SKIP
        >>> dm.setup("fit"); next(iter(dm.train_dataloader()))["pixel_values"].shape  # doctest: +SKIP
        torch.Size([4, 3, 32, 32])
    """

    def __init__(
        self,
        dataset: str = "mnist5k",
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        train_size: int | None = None,
        val_size: int | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        dataset_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8 (pixels), got {image_size!r}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels}); got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {list(std)}")
        for name, size in (("train_size", train_size), ("val_size", val_size)):
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {size!r}")
        self.dataset = dataset
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.train_size = train_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.augment = augment
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.label_names: list[str] = []
        self.data: ImageDataset | None = None  # the whole loaded set, before the split
        self.train_set: _Images | None = None
        self.val_set: _Images | None = None

    @property
    def num_classes(self) -> int:
        if not self.label_names:
            raise RuntimeError("call setup() before reading num_classes")
        return len(self.label_names)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._load()
        if self.data is not None:  # under a Trainer: labels against the model's outputs, naming the image
            check_model_classes(model_num_classes(self.trainer), self.data.labels, self.data.label_names, lambda i: f"image {i}")

    def _load(self) -> None:
        data = load_image_dataset(self.dataset, **self.dataset_kwargs)
        if data.images.shape[1] not in (1, self.channels):
            raise ValueError(f"{self.dataset} images have {data.images.shape[1]} channels; the model takes {self.channels}")
        train_idx, val_idx = stratified_split(data.labels, self.val_fraction, self.split_seed)
        for name, size, available in (("train_size", self.train_size, train_idx), ("val_size", self.val_size, val_idx)):
            if size is not None and size > len(available):
                raise ValueError(f"{name}={size} but the split holds {len(available)} examples (val_fraction={self.val_fraction})")
        train_idx = balanced_prefix(train_idx, data.labels, self.train_size)
        val_idx = balanced_prefix(val_idx, data.labels, self.val_size)
        self.data = data
        self.label_names = list(data.label_names)
        self.train_set = _Images(data.subset(train_idx), self._augmentation() if self.augment else None)
        self.val_set = _Images(data.subset(val_idx))

    @staticmethod
    def _augmentation() -> Any:
        from torchvision.transforms import v2

        return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, h, w)`` -> float ``(B, channels, image_size, image_size)``, resized and normalised."""
        x = images.float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            shrink = min(x.shape[-2:]) > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=shrink)
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        images = torch.stack([image for image, _ in items])
        return {"pixel_values": self.normalize(images), "labels": torch.tensor([label for _, label in items])}

    def _loader(self, dataset: _Images, shuffle: bool) -> DataLoader:
        # Shuffling follows the global seed set by ``seed_everything``.
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
