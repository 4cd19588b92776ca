"""``train(cfg)``: build data, model, callbacks, loggers and trainer from a Hydra config and fit.

``scripts/train.py`` is a thin ``@hydra.main`` around this, so tests run the same code in-process.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..callbacks.metrics_json import _scalars

__all__ = ["instantiate_callbacks", "train"]

log = logging.getLogger(__name__)


def instantiate_callbacks(*groups: DictConfig | None) -> list[pl.Callback]:
    """Instantiate every ``_target_`` entry of the given config mappings (``null`` entries are skipped)."""
    callbacks: list[pl.Callback] = []
    for group in groups:
        if not group:
            continue
        for name, node in group.items():
            if node is None:
                continue
            if not isinstance(node, DictConfig) or "_target_" not in node:
                raise ValueError(f"callback entry {name!r} needs a _target_, got {OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}")
            callbacks.append(instantiate(node))
    return callbacks


def _loggers(cfg: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (cfg or {}).values() if node is not None]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model and return the final metrics (also written to ``metrics.json``)."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, label_names=list(datamodule.label_names))

    callbacks = instantiate_callbacks(cfg.get("callbacks"), cfg.finetune.get("callbacks"), cfg.peft.get("callbacks"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_loggers(cfg.get("logger")) or False)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _scalars(trainer.callback_metrics)
    log.info("Final metrics: %s", metrics)
    return metrics
