"""Data: offline labelled text sets and the text-classification data module."""

from .datasets import DATASETS, TextDataset, load_text_dataset, stratified_split
from .text_datamodule import TextClassificationDataModule

__all__ = ["DATASETS", "TextDataset", "TextClassificationDataModule", "load_text_dataset", "stratified_split"]
