"""Every fine-tuning strategy and PEFT method on the same real task, with the same budget and seeds.

Each (method, seed) is one run of the Hydra entry point ``scripts/train.py`` in its own process (so
peak memory and state are its own), with the method's overrides on top of the budget's. From each
run's ``metrics.json`` it collects the task's two validation metrics (accuracy and macro-F1 for the
classifiers; ROUGE-L or exact match of greedy answers, and the held-out completion loss, for the LLM
tasks), trainable parameters, wall time per epoch and peak memory, plus the size of the saved adapter; then writes, into ``--out``:

- ``results.json``: every run and the per-method mean and standard deviation over seeds;
- ``results.md``: the table;
- ``accuracy_vs_trainable.png`` (log x axis), ``scores.png`` (both metrics per method) and, when runs validate
  more than once, ``validation_curves.png``.
- ``samples/<method>-seed<N>.md`` (LLM tasks): the prompts, references and greedy answers of each run's last validation.

Finished runs are reused (their ``metrics.json`` is read again), so an interrupted benchmark resumes.

    python scripts/benchmark_strategies.py                                  # full budget, 3 seeds -> docs/results/bbc_news
    python scripts/benchmark_strategies.py --quick --methods full,lora --out /tmp/bench
    python scripts/benchmark_strategies.py --list                           # the methods and their overrides
    python scripts/benchmark_strategies.py --finished-only                  # the table from the runs finished so far
    python scripts/benchmark_strategies.py --task mnist                     # EfficientNet-Lite0 on MNIST 5k -> docs/results/mnist

Tasks: ``bbc_news`` (default; all-MiniLM-L6-v2 on BBC News), ``mnist`` (EfficientNet-Lite0, ImageNet
weights, on MNIST 5k at 64 px; the methods that apply to a CNN, ``--list`` gives why the others do not), and
``smollm2_headlines`` / ``smollm2_topics`` (SmolLM2-135M-Instruct writing a BBC article's headline, or its
topic as one word; about 5 s per LoRA step of 4 x 384 tokens on a 2-core CPU).

On a machine with internet, the same benchmark on a hub model: ``--extra model=hf_encoder
model.name_or_path=roberta-base`` (with ``HF_HUB_OFFLINE=0``), or for images ``--task mnist --extra
model.backbone=resnet50 model.pretrained=true`` (LoRA's targets are EfficientNet's: pass
``--methods`` without ``lora``, or add ``peft.target_modules=[...]`` for the other network).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

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
# The vision task: EfficientNet-Lite0 on MNIST 5k through `experiment=mnist_lite0` (lr 1e-3 for every strategy).
# full: all 4,000 training and 1,000 validation digits at 64 px, 3 epochs, validation every half epoch.
VISION_METHODS: dict[str, tuple[str, list[str]]] = {
    "full": ("full fine-tuning", []),
    "linear_probe": ("linear probe (cached features, lr 3e-3)", ["finetune=linear_probe_cached", "finetune.lr=3e-3"]),
    "partial": ("partial: last stage + conv_head + head", ["finetune=partial", "finetune.train_top=1"]),
    "gradual_unfreeze": ("gradual unfreezing (3 groups per epoch)", ["finetune=gradual_unfreeze", "finetune.groups_per_stage=3"]),
    "discriminative": ("discriminative LR (decay 0.8)", ["finetune=discriminative"]),
    "lora": ("LoRA r=8 (1x1 convs: conv_pw, conv_pwl, conv_head)", ["peft=lora", "peft.target_modules=[conv_pw,conv_pwl,conv_head]"]),
    "bitfit": ("BitFit (BatchNorm biases, lr 1e-2)", ["peft=bitfit", "peft.lr=1e-2"]),
}
VISION_EXCLUDED: dict[str, str] = {
    "qlora": "quantizes nn.Linear weights only; the CNN's only linear layer is the new head, which trains in full, so it would be LoRA",
    "ia3": "rescales attention keys/values and transformer feed-forward activations; a CNN has neither",
    "adapter_houlsby": "bottleneck adapters are placed after a transformer block's attention / feed-forward sublayers",
    "adapter_pfeiffer": "bottleneck adapters are placed after a transformer block's feed-forward sublayer",
    "adapter_parallel": "bottleneck adapters run beside a transformer block's sublayers",
    "prompt_tuning": "learned tokens prepended to a sequence; a CNN takes no token sequence",
    "prefix_tuning": "learned key/value prefixes for attention layers; a CNN has none",
    "p_tuning_v2": "learned key/value prefixes in every attention layer; a CNN has none",
}
VISION_BUDGETS: dict[str, list[str]] = {
    "full": ["data.image_size=64", "data.batch_size=32", "trainer.max_epochs=3", "trainer.val_check_interval=0.5"],
    "quick": ["data.train_size=20", "data.val_size=20", "data.image_size=32", "data.batch_size=10", "trainer.max_epochs=2"],
}

COMMON = [
    "logger=none", "callbacks.lr_monitor=null", "callbacks.progress_bar=null", "callbacks.model_checkpoint=null",
    "callbacks.parameter_summary=null",
]


class Task(NamedTuple):
    """One benchmark task: the overrides selecting its model and data, its budgets, its methods, and the two
    validation metrics reported (the first ranks the methods and is plotted)."""

    description: str
    select: list[str]
    budgets: dict[str, list[str]]
    methods: dict[str, tuple[str, list[str]]]
    excluded: dict[str, str] = {}  # noqa: RUF012  (method -> why it does not apply; never mutated)
    metrics: tuple[str, str] = ("val/acc", "val/f1")
    metric_labels: tuple[str, str] = ("val accuracy", "macro-F1")


# The causal-LM tasks: SmolLM2-135M-Instruct through `experiment=smollm2_*` (full fine-tuning at 2e-5, adapters at
# their configs' rates but LoRA/QLoRA at 2e-4 on every linear layer). full: 200 training articles, one epoch,
# 32 validation articles answered greedily and scored.
LLM_METHODS: dict[str, tuple[str, list[str]]] = {
    "zero_shot": ("zero-shot: the base model, untrained", ["train=false"]),
    "full": ("full fine-tuning (lr 2e-5)", []),
    "lora": ("LoRA r=8, all linear layers (lr 1e-3)", ["peft=lora", "peft.target_modules=all-linear", "peft.lr=1e-3"]),
    "qlora": ("QLoRA r=8, 4-bit NF4 base (lr 1e-3)", ["peft=qlora", "peft.target_modules=all-linear", "peft.lr=1e-3"]),
    "ia3": ("IA3", ["peft=ia3"]),
    "adapter_houlsby": ("Houlsby adapters", ["peft=adapter_houlsby"]),
    "prompt_tuning": ("prompt tuning", ["peft=prompt_tuning"]),
    "prefix_tuning": ("prefix tuning", ["peft=prefix_tuning"]),
    "p_tuning_v2": ("P-tuning v2", ["peft=p_tuning_v2"]),
}
LLM_EXCLUDED: dict[str, str] = {
    "bitfit": "Llama-style models (SmolLM2) have no bias parameters",
    "linear_probe": "a language model has no new task head to probe with",
}
LLM_BUDGETS: dict[str, list[str]] = {
    "full": ["data.train_size=200", "data.val_size=32", "trainer.max_epochs=1"],
    "quick": ["data.train_size=8", "data.val_size=4", "data.max_length=64", "data.batch_size=4", "data.generate_size=2",
              "model.max_new_tokens=4", "trainer.max_steps=2"],
}

# The LoRA family on the default text task, each against plain LoRA in the same run (same budget, targets, rank).
LORA_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "lora": ("LoRA r=8 (query, value; lr 3e-3)", ["peft=lora"]),
    "rslora": ("rsLoRA: scale alpha/sqrt(r)", ["peft=lora", "peft.use_rslora=true"]),
    "dora": ("DoRA", ["peft=dora"]),
    "lora_plus": ("LoRA+ (B at 16x A's 1e-3)", ["peft=lora_plus"]),
    "pissa": ("PiSSA init (lr 5e-4)", ["peft=pissa"]),
    "olora": ("OLoRA init (lr 5e-4)", ["peft=pissa", "peft.init=olora"]),
}

# The LoRA family on the LLM topic task: every variant on all linear layers, plain LoRA at the LLM table's rate.
LLM_LORA_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "lora": ("LoRA r=8 (lr 1e-3)", ["peft=lora", "peft.lr=1e-3"]),
    "rslora": ("rsLoRA: scale alpha/sqrt(r) (lr 1e-3)", ["peft=lora", "peft.use_rslora=true", "peft.lr=1e-3"]),
    "dora": ("DoRA (lr 1e-3)", ["peft=dora", "peft.lr=1e-3"]),
    "lora_plus": ("LoRA+ (A at 2e-4, B at 16x)", ["peft=lora_plus", "peft.lr=2e-4"]),
    "pissa": ("PiSSA init (lr 2e-4)", ["peft=pissa", "peft.lr=2e-4"]),
    "olora": ("OLoRA init (lr 2e-4)", ["peft=pissa", "peft.init=olora", "peft.lr=2e-4"]),
}
LLM_LORA_VARIANTS = {name: (f"{label}, all linear layers", [*o, "peft.target_modules=all-linear"]) for name, (label, o) in LLM_LORA_VARIANTS.items()}

TASKS: dict[str, Task] = {
    "bbc_news": Task("BBC News topics (5 classes), all-MiniLM-L6-v2", [], BUDGETS, METHODS),
    "bbc_lora_variants": Task("The LoRA family on BBC News topics (5 classes), all-MiniLM-L6-v2", [], BUDGETS, LORA_VARIANTS),
    "mnist": Task(
        "MNIST 5k digits (10 classes), EfficientNet-Lite0 (ImageNet weights) at 64 px",
        ["experiment=mnist_lite0"], VISION_BUDGETS, VISION_METHODS, VISION_EXCLUDED,
    ),
    "smollm2_headlines": Task(
        "BBC News headline generation, SmolLM2-135M-Instruct", ["experiment=smollm2_headlines"], LLM_BUDGETS, LLM_METHODS,
        LLM_EXCLUDED, ("val/rougeL", "val/loss"), ("ROUGE-L", "validation loss"),
    ),
    "smollm2_lora_variants": Task(
        "The LoRA family on BBC News topic as one generated word, SmolLM2-135M-Instruct", ["experiment=smollm2_topics"], LLM_BUDGETS,
        LLM_LORA_VARIANTS, {}, ("val/exact_match", "val/loss"), ("exact match", "validation loss"),
    ),
    "smollm2_topics": Task(
        "BBC News topic as one generated word, SmolLM2-135M-Instruct", ["experiment=smollm2_topics"], LLM_BUDGETS, LLM_METHODS,
        LLM_EXCLUDED, ("val/exact_match", "val/loss"), ("exact match", "validation loss"),
    ),
}


def available_methods(methods: dict[str, tuple[str, list[str]]] = METHODS) -> dict[str, tuple[str, list[str]]]:
    """The methods whose config choices exist in this checkout."""
    configs = REPO / "configs"
    out = {}
    for name, (label, overrides) in methods.items():
        choices = [o.split("=", 1) for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
        choices = [(group, choice) for group, choice in choices if (configs / group).is_dir()]  # not plain keys (train=false)
        if all((configs / group / f"{choice}.yaml").exists() for group, choice in choices):
            out[name] = (label, overrides)
    return out


def run_one(method: str, overrides: list[str], seed: int, budget: list[str], extra: list[str], run_dir: Path, log: Path,
            metrics_keys: tuple[str, str] = ("val/acc", "val/f1")) -> dict[str, Any]:
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
    trainable = run.get("trainable_parameters_at_end", run["trainable_parameters"])  # gradual unfreezing starts from the head alone
    return {
        "method": method, "seed": seed,
        "score": data["final"][metrics_keys[0]], "score2": data["final"][metrics_keys[1]],
        "trainable": trainable, "total": run["total_parameters"],
        "epoch_seconds": statistics.mean(run["epoch_seconds"]) if run.get("epoch_seconds") else None,
        "step_seconds": sum(run["epoch_seconds"]) / data["final"]["global_step"] if run.get("epoch_seconds") and data["final"].get("global_step") else None,
        "peak_memory_MiB": run["peak_memory_bytes"] / 2**20, "peak_memory_kind": run["peak_memory_kind"],
        # what must be kept to reuse the result: the adapter file, else the trained weights in fp32
        "saved_MiB": (adapter.stat().st_size if adapter.exists() else 4 * trainable) / 2**20,
        "saved_kind": "adapter file" if adapter.exists() else "trained weights (fp32)",
        "curve": [(h["global_step"], h[metrics_keys[0]]) for h in data["history"] if metrics_keys[0] in h],
    }


def summarise(runs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        acc = [r["score"] for r in mine]
        f1 = [r["score2"] for r in mine]
        first = mine[0]
        rows.append({
            "method": method, "label": labels[method], "seeds": len(mine),
            "score_mean": statistics.mean(acc), "score_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "score2_mean": statistics.mean(f1), "score2_std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
            "trainable": first["trainable"], "trainable_pct": 100.0 * first["trainable"] / first["total"],
            "saved_MiB": first["saved_MiB"], "saved_kind": first["saved_kind"],
            "epoch_seconds": _mean_or_none(r["epoch_seconds"] for r in mine),
            "step_seconds": _mean_or_none(r.get("step_seconds") for r in mine),
            "peak_memory_MiB": max(r["peak_memory_MiB"] for r in mine), "peak_memory_kind": first["peak_memory_kind"],
        })
    return rows


def _mean_or_none(values: Any) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _seconds(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], labels: tuple[str, str] = ("val accuracy", "macro-F1")) -> str:
    head = (f"| method | seeds | {labels[0]} (mean ± std) | {labels[1]} | trainable | % | saved | s / epoch | s / step | peak memory |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['label']} | {r['seeds']} | {r['score_mean']:.3f} ± {r['score_std']:.3f} | {r['score2_mean']:.3f} ± {r['score2_std']:.3f} | "
        f"{r['trainable']:,} | {r['trainable_pct']:.3f} | {_size(r['saved_MiB'])} | {_seconds(r['epoch_seconds'], 0)} | "
        f"{_seconds(r.get('step_seconds'), 2)} | {r['peak_memory_MiB']:,.0f} MiB |\n"
        for r in rows
    )
    return head + body


def _size(mib: float) -> str:
    return f"{mib * 1024:.0f} KiB" if mib < 1 else f"{mib:.1f} MiB"


def _colour(method: str, rows: list[dict[str, Any]]) -> Any:
    """One distinct colour per method, the same in both plots (tab20: up to 20 methods)."""
    import matplotlib

    return matplotlib.colormaps["tab20"](next(i for i, r in enumerate(rows) if r["method"] == method) % 20)


def plots(rows: list[dict[str, Any]], runs: list[dict[str, Any]], out: Path,
          labels: tuple[str, str] = ("validation accuracy", "macro-F1")) -> list[Path]:
    """``accuracy_vs_trainable.png``, ``scores.png`` (both metrics per method, mean ± std over seeds, as bars) and,
    when runs validated more than once, ``validation_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = labels[0]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        if r["trainable"] == 0:  # nothing trained (zero-shot): a baseline across the plot, not a point on the log axis
            ax.axhline(r["score_mean"], linestyle="--", color="grey", label=r["method"])
            ax.legend(fontsize=8)
    for i, r in enumerate(sorted((r for r in rows if r["trainable"] > 0), key=lambda r: r["trainable_pct"])):
        ax.errorbar(r["trainable_pct"], r["score_mean"], yerr=r["score_std"], fmt="o", capsize=3, color=_colour(r["method"], rows))
        # neighbours along x alternate above/below their point so close labels do not overlap
        ax.annotate(r["method"], (r["trainable_pct"], r["score_mean"]), textcoords="offset points", xytext=(5, 4 if i % 2 else -11), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{label[0].upper()}{label[1:]} against trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    first = out / "accuracy_vs_trainable.png"
    fig.tight_layout()
    fig.savefig(first, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True)
    picked = rows[::-1]  # barh draws bottom-up: reversed, the bars read in the table's order, top to bottom
    for ax, key, title in zip(axes, ("score", "score2"), labels):
        ax.barh([r["method"] for r in picked], [r[f"{key}_mean"] for r in picked], xerr=[r[f"{key}_std"] for r in picked], capsize=3,
                color=[_colour(r["method"], rows) for r in picked])
        for y, r in enumerate(picked):  # the value right of its error bar, so the bar's cap does not cross it
            end = r[f"{key}_mean"] + r[f"{key}_std"]
            ax.annotate(f"{r[f'{key}_mean']:.3f}", (end, y), textcoords="offset points", xytext=(4, -3), fontsize=7)
        ax.set_xlim(0, 1.15 * max(r[f"{key}_mean"] + r[f"{key}_std"] for r in picked) or 1)  # room for the last value
        ax.set_title(f"{title} (mean ± std over seeds)", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    scores = out / "scores.png"
    fig.tight_layout()
    fig.savefig(scores, dpi=120)
    plt.close(fig)
    second = out / "validation_curves.png"
    if max((len(x["curve"]) for x in runs), default=0) <= 1:  # one validation per run: a curve would be a dot
        second.unlink(missing_ok=True)  # nor keep one from an earlier call beside this table
        return [first, scores]

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        curves = [dict(x["curve"]) for x in runs if x["method"] == r["method"]]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], marker=".", label=r["method"], color=_colour(r["method"], rows))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{label} (mean over seeds)")
    ax.set_title(f"{label[0].upper()}{label[1:]} during training")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, scores, second]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="bbc_news", help="the model and data set (default: bbc_news)")
    parser.add_argument("--methods", help="comma-separated subset (default: every method available)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few examples (checks that it all runs)")
    parser.add_argument("--out", help="output folder (default: docs/results/<task>)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--list", action="store_true", help="print the methods and their overrides")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: summarise the runs already finished (methods with none are listed as not run)")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    methods = available_methods(task.methods)
    if args.list:
        width = max([42, *(len(label) for label, _ in methods.values())])
        for name, (label, overrides) in methods.items():
            print(f"{name:<18} {label:<{width}} {' '.join(task.select + overrides)}")
        for name, reason in task.excluded.items():
            print(f"{name:<18} not applicable: {reason}")
        return {}
    chosen = args.methods.split(",") if args.methods else list(methods)
    excluded = [m for m in chosen if m in task.excluded]
    if excluded:
        raise SystemExit("; ".join(f"{m} does not apply to task {args.task}: {task.excluded[m]}" for m in excluded))
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown} for task {args.task}; available: {', '.join(methods)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    budget_name = "quick" if args.quick else "full"
    budget = task.select + task.budgets[budget_name]
    out = Path(args.out) if args.out else REPO / "docs" / "results" / args.task
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = []
    for method in chosen:
        for seed in seeds:
            run_dir = out / "runs" / f"{method}-seed{seed}"
            if args.finished_only and not (run_dir / "benchmark_done").exists():
                continue
            start = time.perf_counter()
            result = run_one(method, methods[method][1], seed, budget, args.extra, run_dir, out / "runs" / f"{method}-seed{seed}.log",
                             task.metrics)
            runs.append(result)
            if (run_dir / "samples.md").is_file():  # LLM tasks: the last validation's answers, kept beside the table to read
                (out / "samples").mkdir(exist_ok=True)
                shutil.copyfile(run_dir / "samples.md", out / "samples" / f"{method}-seed{seed}.md")
            print(f"{method:<18} seed {seed}: {task.metrics[0]} {result['score']:.4f}  {task.metrics[1]} {result['score2']:.4f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if not runs:
        raise SystemExit(f"no finished runs in {out / 'runs'} for methods {chosen} and seeds {seeds}")
    rows = summarise(runs, {m: methods[m][0] for m in chosen})
    not_run = [m for m in chosen if all(r["method"] != m for r in runs)]
    table = markdown(rows, task.metric_labels) + (f"\nNot run yet: {', '.join(not_run)}.\n" if not_run else "")
    meta = {
        "task": task.description if not args.extra else f"{task.description}; overrides {args.extra}",
        "budget": budget_name, "overrides": budget + COMMON + args.extra, "seeds": seeds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # torch's CPU threads per run, when set
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "methods": rows, "runs": runs}, indent=2) + "\n")
    title = "" if args.task == "bbc_news" else f"Task: {meta['task']}.\n"
    (out / "results.md").write_text(
        f"{title}Budget `{budget_name}`: {' '.join(budget)}; seeds {seeds}; {meta['machine']}; {meta['date']}.\n\n" + table
    )
    images = plots(rows, runs, out, task.metric_labels)
    print("\n" + table)
    print("wrote", out / "results.json", out / "results.md", *images)
    return {"rows": rows, "runs": runs}


if __name__ == "__main__":
    main()
