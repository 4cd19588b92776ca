"""On SIGTERM (what SLURM, Kubernetes and ``kill`` send), write a resumable checkpoint before the process exits."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["EXIT_SIGTERM", "SigtermCheckpoint"]

log = logging.getLogger(__name__)

EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class SigtermCheckpoint(pl.Callback):
    """Save ``<dirpath>/<filename>`` when training stops on SIGTERM, so the job can resume from it.

    Lightning turns SIGTERM into ``SIGTERMException`` (a ``SystemExit`` with status 0) once the current
    batch ends; without a checkpoint the work since the last one is lost and the scheduler sees a
    success. This callback writes the checkpoint atomically (a temporary file, then a rename) in
    ``on_exception`` and logs how to resume; ``lightning_peft.cli.train`` then exits with
    :data:`EXIT_SIGTERM` (143).

    Args:
        dirpath: folder of the checkpoint; default: the ``ModelCheckpoint``'s folder, else
            ``<default_root_dir>/checkpoints``.
        filename: ``last.ckpt`` by default, so ``ckpt_path=last`` finds it next to ``ModelCheckpoint``'s.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.saved_path: Path | None = None

    def _folder(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            return Path(checkpoint.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self._folder(trainer) / self.filename
        tmp = path.with_name(f".{path.name}.tmp")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)  # every rank takes part (sharded strategies); the strategy writes
        if trainer.is_global_zero:
            if path.is_dir():  # a sharded checkpoint is a folder
                shutil.rmtree(path)
            os.replace(tmp, path)
            log.warning(
                "Received SIGTERM at epoch %d, step %d: saved a resumable checkpoint to %s. Resume with "
                "`python scripts/train.py <same overrides> ckpt_path=%s` (exit status %d).",
                trainer.current_epoch, trainer.global_step, path, path, EXIT_SIGTERM,
            )
        trainer.strategy.barrier("SigtermCheckpoint")
        self.saved_path = path
