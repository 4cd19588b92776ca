"""Alignment on SmolLM2-135M-Instruct, measured before and after: DPO on BBC headline pairs, GRPO on BBC topics.

Each task validates the starting model without training (``train=false``), then trains a LoRA adapter with
validation four times along the way, and writes ``docs/results/smollm2_<task>/``: ``results.json``,
``results.md`` (before / after table) and ``curves.png``. Runs are resumable: a finished run
(``runs/<name>/benchmark_done``) is reused, so rerunning the command only does what is missing.

    python scripts/benchmark_alignment.py --task dpo    # SPIN-style pairs (cached), base model, DPO on LoRA
    python scripts/benchmark_alignment.py --task dpo --lr 5e-5 --out docs/results/smollm2_dpo_sft \
        --sft-adapter docs/results/smollm2_headlines/runs/lora-seed0/adapter   # pairs and DPO from the SFT model
    python scripts/benchmark_alignment.py --task grpo --sft-adapter docs/results/smollm2_topics/runs/lora-seed0/adapter

``dpo``: pairs from ``scripts/make_dpo_pairs.py`` (chosen: the true headline; rejected: the base model's own
greedy headline, or with ``--sft-adapter`` the SFT model's, which DPO then starts from and keeps as its
reference), 160 for training and 32 held out. Scored on the held-out pairs by the implicit-reward
preference accuracy (0 before training: policy = reference), the policy's own preference (chosen more
likely than rejected), and ROUGE-L of greedy headlines of 16 held-out prompts against the true ones.

``grpo``: the SFT model (a saved LoRA adapter of ``experiment=smollm2_topics``, merged first) trained by
GRPO with ``topic_reward`` on 64 training prompts, 4 completions each; scored by the mean reward and exact
match of greedy answers on 32 held-out articles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from benchmark_strategies import run_one  # noqa: E402  (the same resumable runner as the method tables)

PAIRS = REPO / "data" / "dpo" / "bbc_headlines_pairs.jsonl"
DEFAULT_LR = {"dpo": 3e-4, "grpo": 1e-4}


class Task(NamedTuple):
    """What to run: the overrides of the untrained and the trained run, and the metrics reported (the first two
    are what ``run_one`` reads; all are tabulated and plotted)."""

    description: str
    common: list[str]
    train: list[str]
    metrics: list[tuple[str, str]]


TASKS: dict[str, Task] = {
    "dpo": Task(
        "DPO (sigmoid, beta 0.1) on SPIN-style BBC headline pairs, LoRA r=8 on all linear layers, 1 epoch",
        ["experiment=smollm2_dpo", "peft=lora", "peft.target_modules=all-linear", "data.generate_size=16"],
        ["trainer.val_check_interval=0.25"],
        [("val/rewards/accuracy", "preference accuracy (implicit reward)"), ("val/rougeL", "headline ROUGE-L"),
         ("val/logps/accuracy", "policy prefers chosen"), ("val/rewards/margin", "reward margin"),
         ("val/logps/chosen", "log p(chosen)"), ("val/logps/rejected", "log p(rejected)"), ("val/kl", "KL to reference (k3, chosen tokens)"),
         ("val/logratio/chosen", "log π/π_ref per token, chosen"), ("val/logratio/rejected", "log π/π_ref per token, rejected")],
    ),
    "grpo": Task(
        "GRPO with topic_reward, 4 completions per prompt, LoRA r=8 on all linear layers",
        ["experiment=smollm2_grpo", "peft=lora", "peft.target_modules=all-linear"],
        ["trainer.val_check_interval=0.25"],
        [("val/reward", "mean reward (greedy)"), ("val/exact_match", "topic exact match"), ("val/rougeL", "ROUGE-L")],
    ),
}


def make_pairs(path: Path, articles: int, log: Path, adapter: str | None = None) -> None:
    """The DPO pairs (``make_dpo_pairs.py`` reuses its cache when the model and settings match)."""
    command = [sys.executable, str(REPO / "scripts" / "make_dpo_pairs.py"), "--num-articles", str(articles), "--out", str(path)]
    if adapter:
        command += ["--adapter", str(Path(adapter).resolve())]
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        if subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"make_dpo_pairs.py failed; see {log}")


def reported(run_dir: Path, keys: list[str]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """A run's final reported metrics and its validations (step and those metrics), from its metrics.json."""
    data = json.loads((run_dir / "metrics.json").read_text())
    pick = lambda entry: {k: entry[k] for k in keys if k in entry}
    return pick(data["final"]), [{"step": h["global_step"], **pick(h)} for h in data["history"]]


def plot(task: Task, description: str, curve: list[dict[str, float]], before: dict[str, float], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = task.metrics[:3]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6))
    for ax, (key, label) in zip(axes, shown):
        points = [(0, before[key])] + [(h["step"], h[key]) for h in curve if key in h]
        ax.plot(*zip(*points), marker="o")
        ax.set_xlabel("optimizer step")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.suptitle(description, fontsize=9)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--sft-adapter", help="the SFT adapter folder to start from (merged into the weights first; "
                        "required for grpo; for dpo the pairs' rejected answers then come from that model too)")
    parser.add_argument("--lr", type=float, help=f"the adapter's learning rate (default: {DEFAULT_LR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder (default: docs/results/smollm2_<task>)")
    parser.add_argument("--pairs", help=f"dpo: a JSONL of {{prompt, chosen, rejected}} pairs to use as they are (default: made by "
                        f"make_dpo_pairs.py into {PAIRS.relative_to(REPO)}, reused while its fingerprint matches)")
    parser.add_argument("--num-articles", type=int, default=200, help="dpo: articles answered to make the pairs")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both runs")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    out = Path(args.out) if args.out else REPO / "docs" / "results" / f"smollm2_{args.task}"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    common = list(task.common)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.task]
    description = f"{task.description}, lr {lr:g}, from the {'SFT' if args.sft_adapter else 'base'} model"
    if args.task == "grpo" and not args.sft_adapter:
        raise SystemExit("--task grpo needs --sft-adapter <folder> (a saved SFT adapter): "
                         "train one with `scripts/benchmark_strategies.py --task smollm2_topics --methods lora --seeds 0`")
    if args.sft_adapter:
        if not Path(args.sft_adapter).is_dir():
            raise SystemExit(f"--sft-adapter {args.sft_adapter}: no such folder (a saved adapter, e.g. <run>/adapter)")
        common.append(f"model.sft_adapter={Path(args.sft_adapter).resolve()}")
    if args.task == "dpo":
        pairs = Path(args.pairs) if args.pairs else PAIRS if not args.sft_adapter else PAIRS.with_name(PAIRS.stem + "_sft.jsonl")
        if args.pairs is None:
            make_pairs(pairs, args.num_articles, out / "runs" / "make_dpo_pairs.log", args.sft_adapter)
        elif not pairs.is_file():
            raise SystemExit(f"--pairs {pairs}: no such file")
        common.append(f"data.train={pairs.resolve()}")
    keys = [k for k, _ in task.metrics]
    results: dict[str, Any] = {}
    for name, overrides in (("before", ["train=false"]), ("trained", [*task.train, f"peft.lr={lr}"])):
        run_dir = out / "runs" / f"{name}-seed{args.seed}"
        start = time.perf_counter()
        run = run_one(name, common + overrides, args.seed, [], args.extra, run_dir, out / "runs" / f"{name}-seed{args.seed}.log",
                      (keys[0], keys[1]))
        final, validations = reported(run_dir, keys)
        results[name] = {"final": final, "history": validations,
                         "trainable": run["trainable"], "step_seconds": run["step_seconds"], "peak_memory_MiB": run["peak_memory_MiB"]}
        print(f"{name}: " + "  ".join(f"{k} {final[k]:.4f}" for k in keys if k in final) + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    before, after = results["before"]["final"], results["trained"]["final"]
    lines = [f"{description}; seed {args.seed}; {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}.", "",
             "| metric (held-out) | before | after |", "|---|---:|---:|"]
    lines += [f"| {label} | {before[k]:.3f} | {after[k]:.3f} |" for k, label in task.metrics if k in before and k in after]
    trained = results["trained"]
    step = f"{trained['step_seconds']:.1f} s/step" if trained["step_seconds"] else "s/step n/a"
    lines += ["", f"Trainable parameters {trained['trainable']:,}; {step}; peak memory {trained['peak_memory_MiB']:,.0f} MiB (process RSS)."]
    table = "\n".join(lines) + "\n"
    meta = {"task": description, "overrides": [*common, *task.train, f"peft.lr={lr}", *args.extra], "seed": args.seed,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}", "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    (out / "results.md").write_text(table)
    image = plot(task, description, trained["history"], before, out)
    print("\n" + table)
    print("wrote", out / "results.json", out / "results.md", image)
    return results


if __name__ == "__main__":
    main()
