"""Callbacks for subprocess tests of ``scripts/train.py`` (importable there with ``PYTHONPATH=tests``)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl


class PauseAtStep(pl.Callback):
    """After optimizer step ``step``, touch ``marker`` and wait (up to ``timeout`` s) for a SIGTERM.

    Lets a test send a real SIGTERM at a known point of training, from outside the process.
    """

    def __init__(self, step: int, marker: str, timeout: float = 120.0) -> None:
        self.step, self.marker, self.timeout = step, Path(marker), timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.touch()
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)
