"""Checks that the labels of a data set fit the model being trained on it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["check_model_classes", "model_num_classes"]


def model_num_classes(trainer: Any) -> int | None:
    """``num_classes`` of the LightningModule attached to ``trainer`` (its hyperparameter or attribute), if any."""
    model = getattr(trainer, "lightning_module", None) if trainer is not None else None
    if model is None:
        return None
    hparams = getattr(model, "hparams", None) or {}
    n = hparams.get("num_classes", getattr(model, "num_classes", None))
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def check_model_classes(num_classes: int | None, labels: Sequence[int], label_names: Sequence[str], where: Callable[[int], str]) -> None:
    """Raise, naming the first example and its class, when a label has no output among the model's ``num_classes``.

    Without this, the first such batch fails in ``cross_entropy`` with ``IndexError: Target 5 is out of bounds``.
    """
    if num_classes is None:
        return
    i = next((i for i, y in enumerate(labels) if y >= num_classes), None)
    if i is None:
        return
    raise ValueError(
        f"The model has num_classes={num_classes}, but the data has {len(label_names)} classes {list(label_names)}: "
        f"{where(i)} has label {label_names[labels[i]]!r} (class {labels[i]}). Give the model num_classes="
        f"{len(label_names)} (the data module's num_classes after setup(); with LightningCLI, link "
        "data.num_classes to model.init_args.num_classes or set it in the YAML)."
    )
