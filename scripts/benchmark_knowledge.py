"""Knowledge injection measured: BBC News topics from 100 articles, with and without an external vector per article.

The external vector is TF-IDF -> TruncatedSVD -> standardised (scikit-learn), fitted on the training
articles only. The encoder is all-MiniLM-L6-v2 (offline copy), frozen (``FreezeBackbone``: a linear
probe), mean pooling, 128 tokens. Variants, each trained with the same budget and seeds:

- ``none``: the probe alone (``FeatureCache`` serves the frozen features);
- ``late``: ``KnowledgeInjection("late")``: the vector joins the pooled features before the widened head (cached too);
- ``early``: ``KnowledgeInjection("early")``: a zero-initialised projection of the vector is added to the token
  embeddings, so every step runs the frozen encoder forward and backward (no cache);
- ``vector_only``: a logistic regression on the external vector alone (scikit-learn), for reference.

Accuracy is measured on held-out validation articles of the same stratified split. Every finished run is
stored in ``results.json`` at once and skipped when the script runs again with the same settings, so an
interrupted benchmark resumes. Writes ``results.{json,md,png}`` into ``--out``.

    nice -n 5 python scripts/benchmark_knowledge.py                     # -> docs/results/knowledge_injection
    python scripts/benchmark_knowledge.py --quick --out /tmp/knowledge  # a smoke run (seconds per variant)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
VARIANTS = ("none", "late", "early", "vector_only")
LABELS = {
    "none": "probe, no injection",
    "late": "probe + late fusion (concat to pooled)",
    "early": "probe + early fusion (added to embeddings)",
    "vector_only": "external vector alone (logistic regression)",
}


class ExternalVectors:
    """TF-IDF -> TruncatedSVD(dim) -> StandardScaler, fitted on the training texts: ``text -> list of dim floats``."""

    def __init__(self, texts: list[str], dim: int, seed: int = 0) -> None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.pipeline = make_pipeline(
            TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=2),
            TruncatedSVD(dim, random_state=seed),
            StandardScaler(),
        ).fit(texts)

    def __call__(self, text: str) -> list[float]:
        return self.pipeline.transform([text])[0].tolist()

    def many(self, texts: list[str]) -> Any:
        return self.pipeline.transform(texts)


def split_texts(args: argparse.Namespace) -> tuple[list[str], list[int], list[str], list[int]]:
    """The training and held-out articles exactly as ``TextClassificationDataModule`` selects them."""
    from lightning_peft.data.datasets import load_bbc_news, stratified_split

    data = load_bbc_news()
    train, val = stratified_split(data.labels, 0.2, args.split_seed)
    train, val = train[: args.train_size], val[: args.val_size]
    return [data.texts[i] for i in train], [data.labels[i] for i in train], [data.texts[i] for i in val], [data.labels[i] for i in val]


def run_model(variant: str, seed: int, vectors: ExternalVectors, args: argparse.Namespace) -> dict[str, Any]:
    """Train one probe variant; return its held-out accuracy / macro-F1, trainable parameters and wall time."""
    import lightning.pytorch as pl
    import torch

    from lightning_peft import FeatureCache, FreezeBackbone, KnowledgeInjection, TextClassificationDataModule, TextClassifier
    from lightning_peft.utils.param_count import count_parameters

    pl.seed_everything(seed, workers=True)
    data = TextClassificationDataModule(
        "bbc_news", args.model, max_length=args.max_length, batch_size=args.batch_size, train_size=args.train_size,
        val_size=args.val_size, split_seed=args.split_seed, features=None if variant == "none" else vectors,
    )
    model = TextClassifier(args.model, 5, optimizer=partial(torch.optim.AdamW, lr=args.lr))
    callbacks: list[pl.Callback] = [FreezeBackbone(verbose=False)]
    if variant != "none":
        callbacks.append(KnowledgeInjection(variant, dim=args.dim))
    if variant != "early":  # early fusion changes what the encoder computes: nothing to cache
        callbacks.append(FeatureCache(cache_dir=args.cache_dir))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=args.epochs, check_val_every_n_epoch=args.epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"acc": metrics["val/acc"], "f1": metrics["val/f1"], "trainable": count_parameters(model).trainable, "seconds": round(seconds, 1)}


def run_vector_only(seed: int, vectors: ExternalVectors, split: tuple, args: argparse.Namespace) -> dict[str, Any]:
    """Logistic regression on the external vector alone (what the injected features know by themselves)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    train_texts, train_labels, val_texts, val_labels = split
    start = time.perf_counter()
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(vectors.many(train_texts), train_labels)
    predicted = clf.predict(vectors.many(val_texts))
    return {"acc": float(accuracy_score(val_labels, predicted)), "f1": float(f1_score(val_labels, predicted, average="macro")),
            "trainable": int(clf.coef_.size + clf.intercept_.size), "seconds": round(time.perf_counter() - start, 1)}


def summarise(runs: dict[str, dict[str, Any]], variants: list[str], seeds: list[int]) -> dict[str, dict[str, Any]]:
    out = {}
    for variant in variants:
        done = [runs[f"{variant}/seed{s}"] for s in seeds if f"{variant}/seed{s}" in runs]
        if not done:
            continue
        acc = [r["acc"] for r in done]
        out[variant] = {
            "label": LABELS[variant], "seeds": len(done), "acc_mean": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "f1_mean": statistics.mean(r["f1"] for r in done), "acc_per_seed": acc, "trainable": done[0]["trainable"],
            "seconds_mean": statistics.mean(r["seconds"] for r in done),
        }
    return out


def write_report(results: dict[str, Any], out: Path) -> None:
    from lightning_peft.utils.atomic_files import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", results)
    cfg = results["config"]
    summary = {v: results["summary"][v] for v in VARIANTS if v in results["summary"]}  # table order, whatever the JSON's
    lines = [
        f"BBC News, {cfg['train_size']} training articles, {cfg['val_size']} held-out articles; {cfg['model'].split('/')[-1]} frozen "
        f"(linear probe), mean pooling, {cfg['max_length']} tokens, {cfg['epochs']} epochs, AdamW lr {cfg['lr']}, batch {cfg['batch_size']}. "
        f"External vector: TF-IDF -> TruncatedSVD({cfg['dim']}) -> standardised, fitted on the training articles only. "
        f"Seeds {cfg['seeds']}. Machine: {results['machine']}.",
        "",
        "| variant | held-out accuracy (mean ± std) | per seed | macro-F1 | trainable parameters | wall time per run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary.values():
        per_seed = ", ".join(f"{a:.3f}" for a in s["acc_per_seed"])
        lines.append(f"| {s['label']} | {s['acc_mean']:.3f} ± {s['acc_std']:.3f} | {per_seed} | {s['f1_mean']:.3f} | {s['trainable']:,} | {s['seconds_mean']:.0f} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot(summary, out / "results.png")


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    means = [summary[n]["acc_mean"] for n in names]
    ax.bar(range(len(names)), means, yerr=[summary[n]["acc_std"] for n in names], color="#9ab", capsize=4)
    for i, n in enumerate(names):
        ax.scatter([i] * len(summary[n]["acc_per_seed"]), summary[n]["acc_per_seed"], color="k", s=12, zorder=3)
    ax.set_xticks(range(len(names)), [LABELS[n].replace(" (", "\n(") for n in names], fontsize=7)
    low = min(min(summary[n]["acc_per_seed"]) for n in names)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Knowledge injection on BBC News (100 training articles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "knowledge_injection")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lightning_peft_knowledge_cache",
                        help="FeatureCache folder (frozen encoder features, reused across seeds and reruns)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model", default=MODEL, help="encoder (hub id or folder)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--train-size", type=int, default=100)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dim", type=int, default=32, help="size of the external vector (SVD components)")
    parser.add_argument("--quick", action="store_true", help="tiny budget for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.max_length, args.epochs, args.dim = 20, 10, 32, 1, 8
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    config = {k: getattr(args, k) for k in ("model", "train_size", "val_size", "split_seed", "max_length", "batch_size", "epochs", "lr", "dim")}
    path = args.out / "results.json"
    previous: dict[str, Any] = {}
    if path.exists():
        import json

        previous = json.loads(path.read_text())
    same = {k: v for k, v in previous.get("config", {}).items() if k != "seeds"} == config
    runs = dict(previous.get("runs", {})) if same else {}  # runs made with other settings are not reused
    config["seeds"] = seeds
    results = {"config": config, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.system()}", "runs": runs}

    split = split_texts(args)
    vectors = ExternalVectors(split[0], args.dim)
    for seed in seeds:
        for variant in variants:
            key = f"{variant}/seed{seed}"
            if key in runs:
                continue
            print(f"[benchmark_knowledge] {key} ...", flush=True)
            runs[key] = run_vector_only(seed, vectors, split, args) if variant == "vector_only" else run_model(variant, seed, vectors, args)
            print(f"[benchmark_knowledge] {key}: {runs[key]}", flush=True)
            results["summary"] = summarise(runs, variants, seeds)
            write_report(results, args.out)
    results["summary"] = summarise(runs, variants, seeds)
    write_report(results, args.out)
    return results


if __name__ == "__main__":
    main()
