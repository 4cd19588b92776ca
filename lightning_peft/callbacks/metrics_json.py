"""Write the validation metrics of every epoch, and the final ones, to a JSON file in the run directory."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..utils.atomic_files import atomic_write_json
from ..utils.param_count import count_parameters

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


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: CUDA memory allocated by torch on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda_allocated"}
    import resource

    return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak_memory_kind": "process_rss"}


class MetricsJSON(pl.Callback):
    """Keep ``metrics.json`` up to date: ``{"final": {...}, "history": [{epoch, step, ...}, ...], "run": {...}}``.

    ``run`` holds what trained (trainable and total parameters at fit start; 0 trainable and
    ``trained: false`` under ``trainer.validate``), the wall time of each
    training epoch and the peak memory (CUDA allocated on a GPU, process RSS on a CPU). Rewritten
    atomically after each validation run (sanity checks excluded) and at fit end, so a killed run
    still leaves the metrics it reached.

    Args:
        filename: file name, relative to ``dirpath``.
        dirpath: folder; default: the trainer's ``default_root_dir`` (the Hydra run directory).
    """

    def __init__(self, filename: str = "metrics.json", dirpath: str | None = None) -> None:
        self.filename = filename
        self.dirpath = dirpath
        self.history: list[dict[str, float]] = []
        self.run: dict[str, Any] = {}
        self.path: Path | None = None
        self._epoch_start: float | None = None

    def _write(self, trainer: pl.Trainer) -> None:
        self.path = Path(self.dirpath or trainer.default_root_dir) / self.filename
        final = _scalars(trainer.callback_metrics)
        final.update(epoch=trainer.current_epoch, global_step=trainer.global_step)
        self.run.update(peak_memory(trainer.strategy.root_device), world_size=trainer.world_size)
        self._dump({"final": final, "history": self.history, "run": self.run})

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = count_parameters(pl_module)
        self.run.update(trainable_parameters=counts.trainable, total_parameters=counts.total)
        self.run.setdefault("epoch_seconds", [])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_start is not None:
            self.run.setdefault("epoch_seconds", []).append(round(time.perf_counter() - self._epoch_start, 3))
            self._epoch_start = None

    @rank_zero_only
    def _dump(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.path, data)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # trainer.validate(): nothing trains, so say so
            self.run.update(trained=False, trainable_parameters=0, total_parameters=count_parameters(pl_module).total)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = _scalars(trainer.callback_metrics)
        entry.update(epoch=trainer.current_epoch, global_step=trainer.global_step)
        self.history.append(entry)
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # what trained by the end (gradual unfreezing starts with the head alone)
        self.run.update(trainable_parameters_at_end=count_parameters(pl_module).trainable)
        self._write(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "epoch_seconds": list(self.run.get("epoch_seconds", []))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.run["epoch_seconds"] = list(state_dict.get("epoch_seconds", []))
