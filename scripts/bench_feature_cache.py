"""Time a linear probe with and without FeatureCache, on the same data, seed and model.

    python scripts/bench_feature_cache.py                      # all-MiniLM-L6-v2 on 320 BBC News articles, 5 epochs
    python scripts/bench_feature_cache.py --epochs 10 --train-size 1780 --val-size 445

Three fits: the uncached probe (FreezeBackbone, with the frozen backbone in eval mode as FeatureCache
keeps it), the cached probe building its cache on disk (cold), and the cached probe again, reading
that cache (warm). Prints wall times, speed-ups and the final validation metrics of each (they agree
to float precision). ``--train-mode-reference`` adds FreezeBackbone alone, whose frozen backbone
runs with dropout on (Lightning calls ``model.train()``): slower, and noisier features.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--val-size", type=int, default=80)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--train-mode-reference", action="store_true", help="also time FreezeBackbone alone (dropout on)")
    args = parser.parse_args()

    import lightning.pytorch as pl
    import torch

    from lightning_peft import (
        FeatureCache,
        FreezeBackbone,
        TextClassificationDataModule,
        TextClassifier,
    )

    class EvalBackbone(pl.Callback):
        """The uncached reference: the frozen backbone in eval mode (no dropout), like FeatureCache runs it."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.backbone.eval()

    def fit(callbacks: list) -> tuple[float, dict[str, float]]:
        pl.seed_everything(0, verbose=False)
        data = TextClassificationDataModule(
            "bbc_news", tokenizer=args.model, max_length=args.max_length, batch_size=args.batch_size,
            train_size=args.train_size, val_size=args.val_size,
        )
        data.setup("fit")  # tokenising is the same in both runs: keep it out of the timing
        model = TextClassifier(args.model, num_classes=data.num_classes, optimizer=partial(torch.optim.AdamW, lr=3e-3))
        trainer = pl.Trainer(
            accelerator=args.accelerator, devices=1, max_epochs=args.epochs, callbacks=callbacks, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        elapsed = time.perf_counter() - start
        return elapsed, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    with tempfile.TemporaryDirectory() as cache_dir:
        runs = {"uncached, backbone in eval": fit([FreezeBackbone(verbose=False), EvalBackbone()])}
        if args.train_mode_reference:
            runs["uncached, FreezeBackbone alone"] = fit([FreezeBackbone(verbose=False)])
        runs["cached, cold (builds cache)"] = fit([FeatureCache(cache_dir=cache_dir)])
        runs["cached, warm (reads cache)"] = fit([FeatureCache(cache_dir=cache_dir)])
    base = runs["uncached, backbone in eval"][0]
    print(
        f"\nLinear probe of {args.model}: {args.epochs} epochs, {args.train_size} train / {args.val_size} val examples, "
        f"batch {args.batch_size}, {args.max_length} tokens, torch threads {torch.get_num_threads()}"
    )
    print(f"{'run':<30} {'fit time':>9} {'speed-up':>9}  final validation metrics")
    for name, (seconds, metrics) in runs.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(f"{name:<30} {seconds:>8.1f}s {base / seconds:>8.2f}x  {shown}")


if __name__ == "__main__":
    main()
