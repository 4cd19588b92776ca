"""Probing: extract (and cache) features of any layer with a chosen pooling, and fit a classifier on them.

``extract_features`` runs a model once over a data loader (eval mode, no gradients, stopping right
after the chosen layer) and returns one feature row per example; with ``cache_dir`` the rows are
stored on disk keyed by model, layer, pooling and each example's content (see
:mod:`lightning_peft.features.store`), so a second call costs nothing but reading the inputs.
``fit_classifier`` fits scikit-learn's ``LogisticRegression`` (or any estimator with
``fit``/``score``) on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..groups.backbone import find_backbone
from ..groups.matching import format_names, match_module_names
from .feature_point import find_feature_point
from .pooling import EXTRACT_POOLINGS, pool_output
from .store import FeatureStore, module_fingerprint, sample_keys
from .verify import features_agree

__all__ = ["EXTRACT_POOLINGS", "FeatureSet", "extract_features", "fit_classifier", "pool_output"]


@dataclass
class FeatureSet:
    """``features`` ``(N, D)`` in data-loader order, and ``labels`` ``(N,)`` when the batches carry them."""

    features: Tensor
    labels: Tensor | None


class _Stop(Exception):
    """Raised by the capture hook: nothing after the chosen layer needs to run."""


def _split(batch: Any, labels_key: str) -> tuple[tuple, dict, Tensor | None]:
    """(args, kwargs, labels) of a batch: dicts lose ``labels_key``; tuples are ``(inputs, labels)``."""
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k != labels_key}, batch.get(labels_key)
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}, batch[1] if len(batch) > 1 else None
    return (batch,), {}, None


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def extract_features(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    layer: str | None = None,
    pooling: str = "head_input",
    head: str | None = None,
    backbone: str | list[str] | None = None,
    labels_key: str = "labels",
    cache_dir: str | Path | None = None,
) -> FeatureSet:
    """Features of every example of ``dataloader``: ``model``'s head input, or ``layer``'s output pooled.

    Args:
        model: called as ``model(**batch_without_labels)`` for dict batches, ``model(x)`` for ``(x, y)`` batches.
        dataloader: any iterable of batches (not shuffled, if the order matters to you).
        layer: module name (pattern) whose output to take, e.g. ``"backbone.encoder.layer.3"``; default: the backbone.
        pooling: ``head_input`` (what the model feeds its head; ``layer`` must be ``None``) or one of
            ``cls``, ``mean``, ``last``, ``pooler``, ``avg``, ``flatten`` (see :func:`pool_output`).
        head, backbone: patterns naming the head / backbone when they are not found automatically.
        labels_key: the labels' key in dict batches.
        cache_dir: folder for the cache file; ``None`` computes everything.

    Example:
        >>> train = extract_features(model, loader, layer="backbone.encoder.layer.3", pooling="mean")  # doctest: +SKIP
        >>> clf, metrics = fit_classifier(train, val)  # doctest: +SKIP
    """
    if pooling not in EXTRACT_POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; choose one of {EXTRACT_POOLINGS}")
    exclude: list[nn.Module] = []
    if pooling == "head_input":
        if layer is not None:
            raise ValueError("pooling='head_input' takes what the model feeds its head; give layer=None, or another pooling.")
        point = find_feature_point(model, head, backbone)
        target, name = model.get_submodule(point.head), point.head
        exclude = [target]
    else:
        names = match_module_names(model, layer, what="layer") if layer is not None else list(find_backbone(model, backbone).backbone)
        if len(names) != 1:
            raise ValueError(f"Features come from one module; {layer or 'the backbone'!r} names {format_names(names, 8)}. Name one.")
        name = names[0]
        target = model.get_submodule(name) if name else model
    captured: list[Tensor] = []
    mask: list[Tensor | None] = [None]

    def on_input(module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    def on_output(module: nn.Module, args: tuple, output: Any) -> None:
        captured.append(pool_output(output, pooling, mask[0]))
        raise _Stop

    handle = target.register_forward_pre_hook(on_input) if pooling == "head_input" else target.register_forward_hook(on_output)
    meta = {"model": module_fingerprint(model, exclude=exclude), "layer": name, "pooling": pooling}
    store, path, from_disk, verified = FeatureStore(), None, False, False
    if cache_dir is not None:
        path = Path(cache_dir) / f"{type(model).__name__}-{meta['model'][:16]}-{name or 'model'}-{pooling}.pt"
        loaded, problem = FeatureStore.load(path, meta)
        if loaded is not None:
            store, from_disk = loaded, True
        elif problem != "missing":
            rank_zero_warn(f"extract_features: {path} is {problem}; ignoring it and rebuilding the cache.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[Tensor] = []
    labels: list[Tensor] = []
    dirty = False
    try:
        with torch.no_grad():
            for batch in dataloader:
                args, kwargs, y = _split(_to(batch, device), labels_key)
                keys = sample_keys(args, kwargs)
                missing = store.missing(keys)
                if missing or (from_disk and not verified):
                    captured.clear()
                    mask[0] = kwargs.get("attention_mask")
                    try:
                        model(*args, **kwargs)
                    except _Stop:
                        pass
                    if len(captured) != 1:
                        raise RuntimeError(f"extract_features: {name or 'the model'} ran {len(captured)} times in one forward; expected once.")
                    fresh = captured[0].detach()
                    if not missing:
                        verified = True
                        old = store.lookup(keys, device=fresh.device)
                        if not features_agree(old, fresh)[0]:
                            rank_zero_warn(f"extract_features: {path} differs from a fresh pass (stale); rebuilding it.")
                            store.clear()
                    dirty |= store.add(keys, fresh) > 0
                rows.append(store.lookup(keys, device=device))
                if y is not None:
                    labels.append(y)
    finally:
        handle.remove()
        model.train(was_training)
    if path is not None and dirty:
        store.save(path, meta)
    if not rows:
        raise ValueError("extract_features: the data loader yielded no batches.")
    return FeatureSet(torch.cat(rows), torch.cat(labels) if len(labels) == len(rows) else None)


def fit_classifier(train: FeatureSet, val: FeatureSet | None = None, estimator: Any = None, **kwargs: Any) -> tuple[Any, dict[str, float]]:
    """Fit ``estimator`` (default: scikit-learn's ``LogisticRegression(max_iter=1000, **kwargs)``) on cached features.

    Returns:
        (the fitted estimator, ``{"train/acc": ..., "val/acc": ...}`` from its ``score``).

    Raises:
        ImportError: for the default estimator when scikit-learn is not installed.
    """
    if estimator is None:
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError as err:
            raise ImportError(
                "fit_classifier's default LogisticRegression needs scikit-learn, which is not installed. "
                "HINT: pip install scikit-learn, or pass estimator=<any object with fit(X, y) and score(X, y)>."
            ) from err
        estimator = LogisticRegression(max_iter=1000, **kwargs)
    elif kwargs:
        raise ValueError(f"fit_classifier: keyword arguments {sorted(kwargs)} configure the default LogisticRegression only.")
    for split, data in (("train", train), ("val", val)):
        if data is not None and data.labels is None:
            raise ValueError(f"fit_classifier: the {split} features have no labels (batches without a labels key or (x, y) form).")
    x, y = train.features.float().cpu().numpy(), train.labels.cpu().numpy()
    estimator.fit(x, y)
    metrics = {"train/acc": float(estimator.score(x, y))}
    if val is not None:
        metrics["val/acc"] = float(estimator.score(val.features.float().cpu().numpy(), val.labels.cpu().numpy()))
    return estimator, metrics
