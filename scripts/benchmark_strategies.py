"""Every fine-tuning strategy and PEFT method on the same real task, with the same budget and seeds.

Each (method, seed) is one run of the Hydra entry point ``scripts/train.py`` in its own process (so
peak memory and state are its own), with the method's overrides on top of the budget's. From each
run's ``metrics.json`` it collects validation accuracy and macro-F1, trainable parameters, wall time
per epoch and peak memory, plus the size of the saved adapter; then writes, into ``--out``:

- ``results.json``: every run and the per-method mean and standard deviation over seeds;
- ``results.md``: the table;
- ``accuracy_vs_trainable.png`` (log x axis) and ``validation_curves.png``.

Finished runs are reused (their ``metrics.json`` is read again), so an interrupted benchmark resumes.

    python scripts/benchmark_strategies.py                                  # full budget, 3 seeds -> docs/results/bbc_news
    python scripts/benchmark_strategies.py --quick --methods full,lora --out /tmp/bench
    python scripts/benchmark_strategies.py --list                           # the methods and their overrides

On a machine with internet, the same benchmark on a hub model: ``--extra model=hf_encoder
model.name_or_path=roberta-base`` (with ``HF_HUB_OFFLINE=0``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# name -> (what it is, Hydra overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "full": ("full fine-tuning", []),
    "linear_probe": ("linear probe (cached features)", ["finetune=linear_probe_cached"]),
    "partial": ("partial: top 2 blocks + head", ["finetune=partial", "finetune.train_top=2"]),
    "gradual_unfreeze": ("gradual unfreezing (2 groups per epoch)", ["finetune=gradual_unfreeze", "finetune.groups_per_stage=2"]),
    "discriminative": ("discriminative LR (decay 0.8)", ["finetune=discriminative"]),
    "lora": ("LoRA r=8 (query, value)", ["peft=lora"]),
    "qlora": ("QLoRA r=8, 4-bit NF4 base", ["peft=qlora"]),
    "bitfit": ("BitFit", ["peft=bitfit"]),
    "ia3": ("IA3", ["peft=ia3"]),
    "adapter_houlsby": ("Houlsby adapters", ["peft=adapter_houlsby"]),
    "adapter_pfeiffer": ("Pfeiffer adapters", ["peft=adapter_pfeiffer"]),
    "adapter_parallel": ("parallel adapters", ["peft=adapter_parallel"]),
    "prompt_tuning": ("prompt tuning", ["peft=prompt_tuning"]),
    "p_tuning": ("P-tuning (LSTM prompt encoder)", ["peft=p_tuning"]),
    "prefix_tuning": ("prefix tuning", ["peft=prefix_tuning"]),
    "p_tuning_v2": ("P-tuning v2", ["peft=p_tuning_v2"]),
}

# The same budget for every method. full: 800 of the 1,780 training articles, all 445 validation
# articles, 64 tokens, 3 epochs, validation every half epoch.
BUDGETS: dict[str, list[str]] = {
    "full": ["data.train_size=800", "data.max_length=64", "data.batch_size=16", "trainer.max_epochs=3", "trainer.val_check_interval=0.5"],
    "quick": ["data.train_size=48", "data.val_size=32", "data.max_length=32", "data.batch_size=8", "trainer.max_epochs=2"],
}
COMMON = [
    "logger=none", "callbacks.lr_monitor=null", "callbacks.progress_bar=null", "callbacks.model_checkpoint=null",
    "callbacks.parameter_summary=null",
]


def available_methods() -> dict[str, tuple[str, list[str]]]:
    """The methods whose config choices exist in this checkout."""
    configs = REPO / "configs"
    out = {}
    for name, (label, overrides) in METHODS.items():
        choices = [o.split("=", 1) for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
        if all((configs / group / f"{choice}.yaml").exists() for group, choice in choices):
            out[name] = (label, overrides)
    return out


def run_one(method: str, overrides: list[str], seed: int, budget: list[str], extra: list[str], run_dir: Path, log: Path) -> dict[str, Any]:
    """Train once (or reuse a finished run) and return what its metrics.json holds."""
    metrics = run_dir / "metrics.json"
    done = run_dir / "benchmark_done"
    if not done.exists():
        command = [sys.executable, str(REPO / "scripts" / "train.py"), *budget, *overrides, *COMMON, *extra,
                   f"seed={seed}", f"hydra.run.dir={run_dir}"]
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
        start = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"{method} (seed {seed}) failed with exit code {proc.returncode}; log {log}:\n{tail}")
        done.write_text(f"{time.perf_counter() - start:.1f}\n")
    data = json.loads(metrics.read_text())
    adapter = run_dir / "adapter" / "adapter.safetensors"
    run = data["run"]
    return {
        "method": method, "seed": seed,
        "val_acc": data["final"]["val/acc"], "val_f1": data["final"]["val/f1"],
        "trainable": run["trainable_parameters"], "total": run["total_parameters"],
        "epoch_seconds": statistics.mean(run["epoch_seconds"]) if run.get("epoch_seconds") else None,
        "peak_memory_MiB": run["peak_memory_bytes"] / 2**20, "peak_memory_kind": run["peak_memory_kind"],
        # what must be kept to reuse the result: the adapter file, else the trained weights in fp32
        "saved_MiB": (adapter.stat().st_size if adapter.exists() else 4 * run["trainable_parameters"]) / 2**20,
        "saved_kind": "adapter file" if adapter.exists() else "trained weights (fp32)",
        "curve": [(h["global_step"], h["val/acc"]) for h in data["history"] if "val/acc" in h],
    }


def summarise(runs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        acc = [r["val_acc"] for r in mine]
        f1 = [r["val_f1"] for r in mine]
        first = mine[0]
        rows.append({
            "method": method, "label": labels[method], "seeds": len(mine),
            "acc_mean": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "f1_mean": statistics.mean(f1), "f1_std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
            "trainable": first["trainable"], "trainable_pct": 100.0 * first["trainable"] / first["total"],
            "saved_MiB": first["saved_MiB"], "saved_kind": first["saved_kind"],
            "epoch_seconds": statistics.mean(r["epoch_seconds"] for r in mine if r["epoch_seconds"] is not None),
            "peak_memory_MiB": max(r["peak_memory_MiB"] for r in mine), "peak_memory_kind": first["peak_memory_kind"],
        })
    return rows


def markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    head = (f"| method | val accuracy (mean ± std, {seeds} seeds) | macro-F1 | trainable | % | saved | s / epoch | peak memory |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['label']} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | {r['f1_mean']:.3f} ± {r['f1_std']:.3f} | "
        f"{r['trainable']:,} | {r['trainable_pct']:.3f} | {_size(r['saved_MiB'])} | {r['epoch_seconds']:.0f} | {r['peak_memory_MiB']:,.0f} MiB |\n"
        for r in rows
    )
    return head + body


def _size(mib: float) -> str:
    return f"{mib * 1024:.0f} KiB" if mib < 1 else f"{mib:.1f} MiB"


def plots(rows: list[dict[str, Any]], runs: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        ax.errorbar(r["trainable_pct"], r["acc_mean"], yerr=r["acc_std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["trainable_pct"], r["acc_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Accuracy against trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    first = out / "accuracy_vs_trainable.png"
    fig.tight_layout()
    fig.savefig(first, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        curves = [dict(x["curve"]) for x in runs if x["method"] == r["method"]]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], marker=".", label=r["method"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.set_title("Validation accuracy during training")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    second = out / "validation_curves.png"
    fig.tight_layout()
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated subset (default: every method available)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few examples (checks that it all runs)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "bbc_news"))
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--list", action="store_true", help="print the methods and their overrides")
    args = parser.parse_args(argv)
    methods = available_methods()
    if args.list:
        for name, (label, overrides) in methods.items():
            print(f"{name:<18} {label:<42} {' '.join(overrides)}")
        return {}
    chosen = args.methods.split(",") if args.methods else list(methods)
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {', '.join(methods)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    budget_name = "quick" if args.quick else "full"
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = []
    for method in chosen:
        for seed in seeds:
            run_dir = out / "runs" / f"{method}-seed{seed}"
            start = time.perf_counter()
            result = run_one(method, methods[method][1], seed, BUDGETS[budget_name], args.extra, run_dir, out / "runs" / f"{method}-seed{seed}.log")
            runs.append(result)
            print(f"{method:<18} seed {seed}: val/acc {result['val_acc']:.4f}  macro-F1 {result['val_f1']:.4f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows = summarise(runs, {m: methods[m][0] for m in chosen})
    table = markdown(rows, len(seeds))
    meta = {
        "task": "BBC News topics (5 classes), all-MiniLM-L6-v2" if not args.extra else f"overrides {args.extra}",
        "budget": budget_name, "overrides": BUDGETS[budget_name] + COMMON + args.extra, "seeds": seeds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "methods": rows, "runs": runs}, indent=2) + "\n")
    (out / "results.md").write_text(
        f"Budget `{budget_name}`: {' '.join(BUDGETS[budget_name])}; seeds {seeds}; {meta['machine']}; {meta['date']}.\n\n" + table
    )
    images = plots(rows, runs, out)
    print("\n" + table)
    print("wrote", out / "results.json", out / "results.md", *images)
    return {"rows": rows, "runs": runs}


if __name__ == "__main__":
    main()
