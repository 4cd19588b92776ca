"""End to end: LoRA training throughput and peak memory of a 1.1B Llama-architecture model, ours vs HF PEFT.

The setup of ``shared/bench/e2e_peft_llama_gpu.py`` (TinyLlama shape, random weights, bf16, LoRA r=16
alpha=32 on all linear layers, fp32 adapters, AdamW, sequence 2048 x batch 4), measured in one run for:

- ``floor``: the same frozen model with only the final norm training (backward still crosses every layer);
- ``hf_peft``: ``peft.get_peft_model`` in a plain loop (when peft is importable);
- ``ours``: an unchanged LightningModule, ``Trainer(callbacks=[PEFT(LoRAConfig(...))])`` (fused kernels on);
- ``ours_no_kernels``: the same with ``LoRAConfig(use_kernels=False)`` (eager LoRA path);
- ``ours_addmm`` (on request, ``--modes``): ``ours`` with every LoRA layer on the cuBLAS-backed kernel path
  (``LIGHTNING_PEFT_LORA_PATH=addmm``) instead of the fused GEMM.

Runs from a checkout without install (``python scripts/bench_e2e.py``).

Prints tokens/s, peak memory and the target ratios (ours >= 1.5x PEFT's tokens/s at
<= 0.75x its peak memory), and writes JSON with ``--out``. Needs a CUDA GPU; ``--cpu-smoke`` runs every
mode on a tiny model on the CPU to check the script itself.

    python scripts/bench_e2e.py --out bench_e2e.json
    python scripts/bench_e2e.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without install
os.environ.setdefault("HF_HUB_OFFLINE", "1")
R, ALPHA = 16, 32


def llama_config(smoke: bool) -> Any:
    from transformers import LlamaConfig

    if smoke:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    else:
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return config


def build(config: Any, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device, dtype)


class Clock:
    """Wall time of the measured steps, synchronising the device around them."""

    def __init__(self, device: str, warmup: int) -> None:
        self.device, self.warmup, self.step, self.start, self.end = device, warmup, 0, 0.0, 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def before(self) -> None:
        if self.step == self.warmup:
            self._sync()
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

    def after(self) -> None:
        self.step += 1
        self._sync()
        self.end = time.perf_counter()


def plain_loop(model: torch.nn.Module, params: list, ids: torch.Tensor, steps: int, clock: Clock) -> None:
    opt = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(steps):
        clock.before()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.after()


def run_floor(config, device, dtype, ids, steps, clock) -> int:
    model = build(config, device, dtype)
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    model.enable_input_require_grads()
    plain_loop(model, [model.model.norm.weight], ids, steps, clock)
    return model.model.norm.weight.numel()


def run_hf_peft(config, device, dtype, ids, steps, clock) -> int:
    import peft

    model = peft.get_peft_model(build(config, device, dtype), peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    plain_loop(model, params, ids, steps, clock)
    return sum(p.numel() for p in params)


def run_ours(config, device, dtype, ids, steps, clock, use_kernels: bool) -> int:
    import lightning.pytorch as pl

    from lightning_peft import PEFT, LoRAConfig

    class CausalLM(pl.LightningModule):
        """What a user writes: a causal LM, its loss, AdamW over the trainable parameters."""

        def __init__(self) -> None:
            super().__init__()
            self.model = build(config, device, dtype)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    class Timing(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.before()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.after()

    module = CausalLM()
    loader = torch.utils.data.DataLoader([ids[i] for i in range(ids.shape[0])] * steps, batch_size=ids.shape[0])
    lora = LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear", modules_to_save=None, use_kernels=use_kernels)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[PEFT(lora, check_gradients=False, verbose=False), Timing()],
    )
    trainer.fit(module, loader)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def with_env(env: dict[str, str], fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``env`` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn(*args, **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, to check the script")
    parser.add_argument("--steps", type=int, default=10, help="measured steps (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--modes", default="floor,hf_peft,ours,ours_no_kernels")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_e2e.py needs a CUDA GPU (use --cpu-smoke to check the script on a CPU).", file=sys.stderr)
        sys.exit(2)
    device, dtype = ("cpu", torch.float32) if args.cpu_smoke else ("cuda", torch.bfloat16)
    batch, seq, warmup = (2, 8, 1) if args.cpu_smoke else (args.batch, args.seq, 3)
    steps = (1 if args.cpu_smoke else args.steps) + warmup
    config = llama_config(args.cpu_smoke)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    runners = {
        "floor": run_floor,
        "hf_peft": run_hf_peft,
        "ours": lambda *a: run_ours(*a, use_kernels=True),
        "ours_no_kernels": lambda *a: run_ours(*a, use_kernels=False),
        "ours_addmm": lambda *a: with_env({"LIGHTNING_PEFT_LORA_PATH": "addmm"}, run_ours, *a, use_kernels=True),
    }
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes.split(","):
        if mode == "hf_peft":
            try:
                import peft  # noqa: F401
            except ImportError:
                print("hf_peft: skipped (peft is not installed)")
                continue
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        clock = Clock(device, warmup)
        trainable = runners[mode](config, device, dtype, ids, steps, clock)
        seconds = clock.end - clock.start
        measured = steps - warmup
        results[mode] = {
            "tokens_per_s": round(batch * seq * measured / seconds),
            "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "trainable": trainable,
        }
        print(mode, json.dumps(results[mode]), flush=True)
        if args.out:  # after every mode, so that a run cut short by a time limit leaves what it measured
            with open(args.out, "w") as f:
                json.dump({"partial": True, "results": results}, f, indent=2)
    summary: dict[str, Any] = {}
    if "ours" in results and "hf_peft" in results:
        summary["ours_tokens_per_s_over_peft"] = round(results["ours"]["tokens_per_s"] / results["hf_peft"]["tokens_per_s"], 3)
        if device == "cuda":
            summary["ours_peak_over_peft"] = round(results["ours"]["peak_GiB"] / results["hf_peft"]["peak_GiB"], 3)
    for mode in ("ours", "ours_no_kernels", "hf_peft"):
        if mode in results and "floor" in results:
            summary[f"{mode}_time_over_floor"] = round(results["floor"]["tokens_per_s"] / results[mode]["tokens_per_s"], 3)
    print(json.dumps(summary))
    print("targets: ours_tokens_per_s_over_peft >= 1.5, ours_peak_over_peft <= 0.75")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "batch": batch, "seq": seq, "steps": steps - warmup, "smoke": args.cpu_smoke}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
