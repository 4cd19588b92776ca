"""Where a run's checkpoints go and which one ``ckpt_path`` means: checked before any data or model loads."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["checkpoint_dir", "resolve_ckpt_path"]

log = logging.getLogger(__name__)


def checkpoint_dir(cfg: DictConfig) -> Path:
    """The run's checkpoint folder: ``callbacks.model_checkpoint.dirpath``, else ``<paths.output_dir>/checkpoints``."""
    configured = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    if configured:
        return Path(configured)
    return Path(OmegaConf.select(cfg, "paths.output_dir", default=".")) / "checkpoints"


def resolve_ckpt_path(ckpt_path: str | None, folder: Path) -> str | None:
    """The checkpoint file to resume from, or ``None`` to start fresh.

    ``last`` means the newest ``last*.ckpt`` in ``folder`` (this run directory's checkpoints: written at
    every validation and on SIGTERM); when there is none yet the run starts fresh with a warning, so
    a requeued job can pass ``ckpt_path=last`` from its first start on. Any other value must be an
    existing file (or a sharded checkpoint's folder).

    Raises:
        FileNotFoundError: ``ckpt_path`` names nothing that exists, with where checkpoints are.
    """
    if ckpt_path is None:
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path == "last":
        candidates = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        if not candidates:
            log.warning("ckpt_path=last: no last.ckpt in %s yet, so training starts from scratch.", folder)
            return None
        log.info("ckpt_path=last: resuming from %s", candidates[-1])
        return str(candidates[-1])
    if ckpt_path == "hpc":  # Lightning's own: the newest hpc_ckpt_*.ckpt of a SLURM requeue
        return ckpt_path
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r}: no such checkpoint. HINT: a run's checkpoints are in <run dir>/checkpoints/ "
            "(last.ckpt holds its latest state); pass one of those files, or ckpt_path=last together with "
            "hydra.run.dir=<that run dir> to resume it in place."
        )
    return ckpt_path
