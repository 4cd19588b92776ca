"""``train(cfg)``: build data, model, callbacks, loggers and trainer from a Hydra config and fit.

``scripts/train.py`` is a thin ``@hydra.main`` around this, so tests run the same code in-process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ..callbacks.metrics_json import _scalars
from ..callbacks.rng_state import RNGState
from ..callbacks.sigterm_checkpoint import EXIT_SIGTERM, SigtermCheckpoint
from ..utils.atomic_files import ensure_writable_dir
from .config_check import check_config
from .resume import checkpoint_dir, resolve_ckpt_path

__all__ = ["instantiate_callbacks", "train"]

log = logging.getLogger(__name__)


def instantiate_callbacks(*groups: DictConfig | None) -> list[pl.Callback]:
    """Instantiate every ``_target_`` entry of the given config mappings (``null`` entries are skipped).

    Nodes are converted to plain ``dict``/``list`` (``_convert_="all"`` unless a node sets its own), so no
    OmegaConf object reaches a callback's state and thus a checkpoint that ``torch.load(weights_only=True)`` reads.
    """
    callbacks: list[pl.Callback] = []
    for group in groups:
        if not group:
            continue
        for name, node in group.items():
            if node is None:
                continue
            if not isinstance(node, DictConfig) or "_target_" not in node:
                raise ValueError(f"callback entry {name!r} needs a _target_, got {OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}")
            callbacks.append(instantiate(node) if "_convert_" in node else instantiate(node, _convert_="all"))
    return callbacks


def _loggers(cfg: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (cfg or {}).values() if node is not None]


def _run_callbacks(callbacks: list[pl.Callback], loggers: list[Any], ckpt_dir: Path) -> list[pl.Callback]:
    """The configured callbacks, less those that need a logger when there is none, plus resumability."""
    if not loggers:
        dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
        if dropped:
            log.info("No logger configured: LearningRateMonitor left out (it logs through a logger).")
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not any(isinstance(c, RNGState) for c in callbacks):
        callbacks.append(RNGState())
    if not any(isinstance(c, SigtermCheckpoint) for c in callbacks):
        callbacks.append(SigtermCheckpoint(dirpath=ckpt_dir))
    return callbacks


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model and return the final metrics (also written to ``metrics.json``).

    With ``train: false`` the model is only validated (as built, or from ``ckpt_path``): the zero-shot
    baseline of a pretrained model, or an evaluation of a finished run.

    Output folders are checked writable and ``ckpt_path`` resolved before data or model load. On
    SIGTERM a resumable checkpoint is written (``<checkpoints>/last.ckpt``) and ``SystemExit(143)`` raised.
    """
    check_config(cfg)  # misspelt keys and wrong types fail here, naming the key, before anything is built
    output_dir = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if output_dir is not None:
        ensure_writable_dir(output_dir, "run directory (paths.output_dir)")
    ckpt_dir = checkpoint_dir(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), ckpt_dir)
    ensure_writable_dir(ckpt_dir, "checkpoint folder (callbacks.model_checkpoint.dirpath)")

    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # plain containers only: hyperparameters land in checkpoints, which are read back with weights_only=True
    # classifiers take their classes from the data; other modules (CausalLM) take nothing from it
    classes = {"num_classes": datamodule.num_classes, "label_names": list(datamodule.label_names)} if hasattr(datamodule, "num_classes") else {}
    model = instantiate(cfg.model, **classes, _convert_="all")

    loggers = _loggers(cfg.get("logger"))
    peft = {"peft": cfg.peft} if cfg.get("peft") else None  # the peft node is peft_callback's arguments (none: empty)
    knowledge = {"knowledge": cfg.knowledge} if cfg.get("knowledge") else None  # knowledge=late|early: KnowledgeInjection
    callbacks = instantiate_callbacks(cfg.get("callbacks"), cfg.finetune.get("callbacks"), peft, knowledge)
    callbacks = _run_callbacks(callbacks, loggers, ckpt_dir)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    if not cfg.get("train", True):
        log.info("train=false: validating only%s", f" the checkpoint {ckpt_path}" if ckpt_path else " the model as built (zero-shot)")
        trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = _scalars(trainer.callback_metrics)
        log.info("Final metrics: %s", metrics)
        return metrics
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as stop:
        if stop.code not in (None, 0):
            raise
        raise SIGTERMException(EXIT_SIGTERM) from None  # Lightning's exits 0: a scheduler would call the job done
    metrics = _scalars(trainer.callback_metrics)
    log.info("Final metrics: %s", metrics)
    return metrics
