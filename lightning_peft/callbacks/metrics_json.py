"""Write the validation metrics of every epoch, and the final ones, to a JSON file in the run directory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from ..io import atomic_write_json

__all__ = ["MetricsJSON"]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[key] = number if math.isfinite(number) else str(number)
    return out


class MetricsJSON(pl.Callback):
    """Keep ``metrics.json`` up to date: ``{"final": {...}, "history": [{epoch, step, ...}, ...]}``.

    Rewritten atomically after each validation run (sanity checks excluded) and at fit end, so a
    killed run still leaves the metrics it reached.

    Args:
        filename: file name, relative to ``dirpath``.
        dirpath: folder; default: the trainer's ``default_root_dir`` (the Hydra run directory).
    """

    def __init__(self, filename: str = "metrics.json", dirpath: str | None = None) -> None:
        self.filename = filename
        self.dirpath = dirpath
        self.history: list[dict[str, float]] = []
        self.path: Path | None = None

    def _write(self, trainer: pl.Trainer) -> None:
        self.path = Path(self.dirpath or trainer.default_root_dir) / self.filename
        final = _scalars(trainer.callback_metrics)
        final.update(epoch=trainer.current_epoch, global_step=trainer.global_step)
        self._dump({"final": final, "history": self.history})

    @rank_zero_only
    def _dump(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.path, data)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = _scalars(trainer.callback_metrics)
        entry.update(epoch=trainer.current_epoch, global_step=trainer.global_step)
        self.history.append(entry)
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
