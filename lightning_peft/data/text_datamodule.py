"""A LightningDataModule for text classification: load, split, tokenise once, pad per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ..models.pretrained import load_tokenizer
from .datasets import TextDataset, load_text_dataset, stratified_split
from .labels import check_model_classes, model_num_classes
from .vectors import check_vectors

__all__ = ["TextClassificationDataModule"]


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int], features: list[list[float]] | None = None) -> None:
        self.encodings = encodings
        self.labels = labels
        self.features = features

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        if self.features is not None:
            item["features"] = self.features[i]
        return item


class TextClassificationDataModule(pl.LightningDataModule):
    """Train/validation loaders of tokenised text, split reproducibly and stratified by class.

    Batches are dicts of ``input_ids``/``attention_mask`` (and ``token_type_ids`` where the
    tokenizer makes them) of shape ``(batch, longest_in_batch)``, plus ``labels`` of shape ``(batch,)``
    (and ``features`` ``(batch, F)`` with ``features=...``).

    Args:
        dataset: registered data set name (``bbc_news``, ``tweets``, ``table``).
        tokenizer: tokenizer name or path (usually the model's ``name_or_path``).
        max_length: truncate texts to this many tokens.
        batch_size: examples per batch (validation uses the same).
        val_fraction: share of each class held out for validation.
        train_size / val_size: optionally keep only this many examples (after the split), for quick runs;
            ``None`` keeps all.
        split_seed: seed of the split and subsampling (independent of the training seed).
        num_workers: DataLoader workers.
        dataset_kwargs: passed to the data set loader (e.g. ``path``, ``text_column``, ``label_column``).
        features: an external vector per example, batched as ``features_key`` ``(batch, F)`` float32 (knowledge
            injection): a column of vectors of the table (its name), or a callable ``text -> sequence of F numbers``.
        features_key: the batch key of the vectors.
    """

    def __init__(
        self,
        dataset: str = "bbc_news",
        tokenizer: str = "sentence-transformers/all-MiniLM-L6-v2",
        max_length: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.2,
        train_size: int | None = None,
        val_size: int | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
        dataset_kwargs: dict[str, Any] | None = None,
        features: str | Callable[[str], Sequence[float]] | None = None,
        features_key: str = "features",
    ) -> None:
        super().__init__()
        if features is not None and not isinstance(features, str) and not callable(features):
            raise TypeError(f"features must be a column name, a callable text -> vector, or None; got {type(features).__name__}")
        self.features = features
        self.features_key = features_key
        for name, size in (("train_size", train_size), ("val_size", val_size)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"{name} must be a positive integer, or None to keep every example; got {size!r}")
        self.dataset = dataset
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.train_size = train_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.label_names: list[str] = []
        self.data: TextDataset | None = None  # the whole loaded set, before the split
        self.train_set: _Encoded | None = None
        self.val_set: _Encoded | None = None
        self.tokenizer = None

    @property
    def num_classes(self) -> int:
        if not self.label_names:
            raise RuntimeError("call setup() before reading num_classes")
        return len(self.label_names)

    def _encode(self, data: TextDataset) -> _Encoded:
        enc = self.tokenizer(data.texts, truncation=True, max_length=self.max_length)
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return _Encoded({k: enc[k] for k in keep}, data.labels, self._vectors(data))

    def _vectors(self, data: TextDataset) -> list[list[float]] | None:
        """Each example's external vector: the table's column, or ``features(text)``; ``None`` without ``features``."""
        if self.features is None:
            return None
        if isinstance(self.features, str):
            return data.features
        vectors = [list(map(float, self.features(text))) for text in data.texts]
        check_vectors(vectors, data.where, len(data.texts))
        return vectors

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._load()
        # Under a Trainer, also check the labels against the model's outputs (fails here, naming the row,
        # rather than in cross_entropy with "Target 5 is out of bounds").
        if self.data is not None:
            check_model_classes(model_num_classes(self.trainer), self.data.labels, self.data.label_names, self.data.where)

    def _load(self) -> None:
        kwargs = dict(self.dataset_kwargs)
        if isinstance(self.features, str):
            if self.dataset != "table":
                raise ValueError(
                    f"features={self.features!r} names a column, but only the 'table' data set has columns (got {self.dataset!r}); "
                    "pass a callable text -> vector instead"
                )
            kwargs["feature_column"] = self.features
        data = load_text_dataset(self.dataset, **kwargs)
        train_idx, val_idx = stratified_split(data.labels, self.val_fraction, self.split_seed)
        train_idx = train_idx[: self.train_size] if self.train_size is not None else train_idx
        val_idx = val_idx[: self.val_size] if self.val_size is not None else val_idx
        self.data = data
        self.label_names = list(data.label_names)
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.train_set = self._encode(data.subset(train_idx))
        self.val_set = self._encode(data.subset(val_idx))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of encoded examples to the longest one: ``(batch, length)`` tensors."""
        length = max(len(it["input_ids"]) for it in items)
        pad_id = self.tokenizer.pad_token_id or 0
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in items[0]:
                batch[key] = torch.tensor([it[key] + [fill] * (length - len(it[key])) for it in items])
        batch["labels"] = torch.tensor([it["labels"] for it in items])
        if "features" in items[0]:
            batch[self.features_key] = torch.tensor([it["features"] for it in items], dtype=torch.float32)
        return batch

    def _loader(self, dataset: _Encoded, shuffle: bool) -> DataLoader:
        # Shuffling follows the global seed set by ``seed_everything``.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
