"""Checkpoint the random number generators, so a resumed run shuffles and drops out as the uninterrupted one."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

__all__ = ["RNGState"]


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU (and initialised CUDA) generators, as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators back to a state from :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(pl.Callback):
    """Save the global RNG states in every checkpoint and put them back when training resumes from one.

    Lightning checkpoints weights, optimizers, schedulers and loops but not the generators, so after a
    resume the data order of ``shuffle=True`` loaders and every dropout mask differ from the
    uninterrupted run. With this callback a run resumed from an end-of-epoch checkpoint (what
    ``ModelCheckpoint`` writes by default) continues bit-identically; a mid-epoch resume restarts the
    epoch's data order anyway (unless the loader is stateful), so there the generators are restored at
    ``on_train_start`` as a best effort. Under DDP the checkpoint holds rank 0's state (all ranks share
    it after ``seed_everything``).

    At an epoch boundary the uninterrupted run creates the epoch's data iterator right after
    ``on_train_epoch_start`` (its creation draws a seed from the global generator), while a resumed run
    reuses the iterator Lightning made during setup. So at the resumed epoch's start this callback
    restores the generators and then re-creates the iterator the same way, and both runs draw the
    same numbers in the same order.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:
            restore_rng_state(self._loaded)  # mid-epoch resume: on_train_epoch_start is skipped

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        restore_rng_state(self._loaded)
        self._loaded = None
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)  # what the uninterrupted run's epoch loop does here (it skips this when resuming)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._loaded = None
