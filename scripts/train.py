"""Hydra entry point: ``python scripts/train.py [group=choice] [key=value] ...`` (``-m`` for sweeps).

Examples:
    python scripts/train.py                                   # default: full fine-tuning of all-MiniLM-L6-v2 on BBC News
    python scripts/train.py finetune=linear_probe trainer.max_epochs=3
    python scripts/train.py -m finetune=full,linear_probe seed=0,1
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # defaults are packaged; set HF_HUB_OFFLINE=0 to use the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here so that config errors (bad choice, bad key) are reported before heavy imports.
    import logging

    from lightning_peft.cli.train import train

    # `import lightning` adds its own console handler; Hydra's root handlers (console + run-dir log
    # file) already show these messages, so drop it to avoid every line printed twice.
    logging.getLogger("lightning").handlers.clear()
    metrics = train(cfg)
    print("\nFinal validation metrics:")
    for key in sorted(metrics):
        value = metrics[key]
        print(f"  {key:<16} {value:.4g}" if isinstance(value, float) else f"  {key:<16} {value}")
    print(f"Run directory: {cfg.paths.output_dir}")
    monitor = cfg.get("optimized_metric")
    return metrics.get(monitor) if monitor else None


if __name__ == "__main__":
    main()
