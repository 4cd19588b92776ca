"""Memory of one LoRA DPO training step: the adapter-disabled reference (no second model) vs a frozen model copy.

Each variant runs in its own subprocess (so peak RSS is its own): load the model, inject LoRA, set up the
reference, then one step (policy forward on chosen + rejected, reference forward, backward, AdamW) on real BBC
headline prompts. Reports the bytes of parameters + buffers held (policy and reference) and the peak RSS.

    python scripts/bench_dpo_memory.py                                   # SmolLM2-135M-Instruct, CPU
    python scripts/bench_dpo_memory.py --out docs/results/smollm2_dpo/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("adapters", "copy")


def _rss_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_bytes(*modules: Any) -> int:
    """Bytes of the distinct parameters and buffers of ``modules``."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: set up, one training step, measurements."""
    import torch

    from lightning_peft import DPO, LoRAConfig, PreferenceDataModule, inject
    from lightning_peft.data.instruction_tasks import bbc_headlines

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    module = DPO(args.model, reference=args.child, beta=0.1)
    inject(module, LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    module.setup("fit")
    train, _ = bbc_headlines()
    records = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": "News: " + r["completion"].lower()} for r in train[: args.pairs]
    ]
    dm = PreferenceDataModule(
        module.tokenizer, train=records, val=records[:1], max_length=args.max_length, batch_size=args.pairs, shuffle=False
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    rss_before = _rss_mb("VmRSS")
    hwm_before = _rss_mb("VmHWM")
    step_start = time.perf_counter()
    out, _ = module.pair_loss(batch)
    out.losses.mean().backward()
    optimizer.step()
    step_s = time.perf_counter() - step_start
    references = module._frozen_reference
    return {
        "reference": args.child,
        "policy_param_buffer_mb": round(tensor_bytes(module.model) / 2**20, 1),
        "reference_param_buffer_mb": round(tensor_bytes(*references) / 2**20, 1) if references else 0.0,
        "total_param_buffer_mb": round(tensor_bytes(module.model, *references) / 2**20, 1),
        "rss_before_step_mb": round(rss_before, 1),
        "peak_rss_before_step_mb": round(hwm_before, 1),
        "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
        "step_s": round(step_s, 2),
        "setup_s": round(step_start - start, 1),
        "rows": list(batch["input_ids"].shape),
        "loss": round(float(out.losses.mean()), 6),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs in the step (2x rows through the model)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args)))
        return {}

    results = {}
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--model",
            args.model,
            "--pairs",
            str(args.pairs),
            "--max-length",
            str(args.max_length),
            "--rank",
            str(args.rank),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(variant, results[variant], flush=True)
    a, c = results["adapters"], results["copy"]
    report = {
        "what": "one LoRA DPO training step; reference = same network with adapters disabled vs a frozen deep copy",
        "model": args.model,
        "pairs": args.pairs,
        "max_length": args.max_length,
        "lora_rank": args.rank,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
        "results": results,
        "summary": {
            "param_buffer_saved_mb": round(c["total_param_buffer_mb"] - a["total_param_buffer_mb"], 1),
            "peak_rss_saved_mb": round(c["peak_rss_mb"] - a["peak_rss_mb"], 1),
            "same_loss": a["loss"] == c["loss"],
        },
    }
    if args.out:
        from lightning_peft.utils.atomic_files import atomic_write_json

        atomic_write_json(args.out, report)
    print(json.dumps(report["summary"]))
    return report


if __name__ == "__main__":
    main()
