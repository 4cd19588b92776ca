"""Data: offline labelled text and image sets, and their classification data modules."""

from .datasets import DATASETS, TextDataset, load_text_dataset, stratified_split
from .image_datamodule import IMAGENET_MEAN, IMAGENET_STD, ImageClassificationDataModule
from .images import IMAGE_DATASETS, ImageDataset, load_image_dataset
from .replay import ReplayBatchSampler, ReplayLoader, ReplaySampler, replay_count
from .text_datamodule import TextClassificationDataModule

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_DATASETS",
    "ImageClassificationDataModule",
    "ImageDataset",
    "ReplayBatchSampler",
    "ReplayLoader",
    "ReplaySampler",
    "TextClassificationDataModule",
    "TextDataset",
    "load_image_dataset",
    "load_text_dataset",
    "replay_count",
    "stratified_split",
]
