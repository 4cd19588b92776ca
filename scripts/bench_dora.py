"""Time DoRA training steps: our DoRA against Hugging Face PEFT's DoRA and against our plain LoRA, in one run.

    python scripts/bench_dora.py                                   # random 4-layer Llama (hidden 512), batch 4 x 128
    python scripts/bench_dora.py --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 3
    python scripts/bench_dora.py --out docs/results/lora_variants/bench_dora_cpu.json

All variants wrap copies of the same base weights with the same adapter tensors (PEFT's are copied into
ours, and the first losses are checked equal), see the same batch, and run forward, backward and an AdamW
step. They are timed in turn, step after step, and the medians are reported, so load changes on a shared
machine hit all alike; the ratios come from the same run. Prints everything and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_llm_step.py

from bench_llm_step import interleaved_medians  # one timing loop for the benchmark scripts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal LM name or folder; default: a random Llama of --hidden/--layers")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (interleaved; the median is reported)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from lightning_peft import LoRAConfig, inject
    from lightning_peft.peft.layer import adapter_layers

    torch.manual_seed(0)
    if args.model:
        from lightning_peft.models.causal_lm import load_causal_lm

        loaded = load_causal_lm(args.model)
        base = loaded[0] if isinstance(loaded, tuple) else loaded
        name = args.model
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875), num_hidden_layers=args.layers,
                             num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
        base = LlamaForCausalLM(config)
        name = f"random Llama: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}"
    base = base.float().train()
    for p in base.parameters():
        p.requires_grad_(False)
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(1))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = dict(r=args.rank, alpha=2 * args.rank, target_modules=targets, dropout=0.0, modules_to_save=None)

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, use_dora=True))
    with torch.no_grad():  # B != 0, so DoRA's norm and LoRA's product are not trivially zero
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01, generator=torch.Generator().manual_seed(2))
    ours = inject(copy.deepcopy(base), LoRAConfig(**lora, use_dora=True))
    plain = inject(copy.deepcopy(base), LoRAConfig(**lora))
    inner = theirs.base_model.model
    with torch.no_grad():
        for mod, layer in adapter_layers(ours):
            src, adapter = inner.get_submodule(mod), layer.adapters["default"]
            adapter.lora_A.copy_(src.lora_A["default"].weight)
            adapter.lora_B.copy_(src.lora_B["default"].weight)
            adapter.lora_magnitude_vector.copy_(src.lora_magnitude_vector["default"].weight)
        for (_, layer), (_, mine) in zip(adapter_layers(plain), adapter_layers(ours)):
            layer.adapters["default"].lora_A.copy_(mine.adapters["default"].lora_A)
            layer.adapters["default"].lora_B.copy_(mine.adapters["default"].lora_B)

    def make_step(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        losses: list[float] = []

        def step():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

        step.losses = losses
        return step

    steps = {"ours_dora": make_step(ours), "peft_dora": make_step(theirs), "ours_lora": make_step(plain)}
    medians = interleaved_medians(steps, args.steps)
    first_ours, first_peft = steps["ours_dora"].losses[0], steps["peft_dora"].losses[0]
    if abs(first_ours - first_peft) > 1e-4 * max(1.0, abs(first_peft)):
        raise SystemExit(f"our DoRA and PEFT's disagree on the first loss ({first_ours} vs {first_peft}): not the same model")
    results = {
        "model": name, "batch": args.batch, "length": args.length, "rank": args.rank, "targets": targets, "steps": args.steps,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end",
        "first_loss_ours_dora": first_ours, "first_loss_peft_dora": first_peft,
        "ours_dora_step_s": medians["ours_dora"], "peft_dora_step_s": medians["peft_dora"], "ours_lora_step_s": medians["ours_lora"],
        "peft_dora_over_ours_dora_time": medians["peft_dora"] / medians["ours_dora"],
        "ours_dora_over_ours_lora_time": medians["ours_dora"] / medians["ours_lora"],
    }
    for key, value in results.items():
        print(f"{key:<32} {value:.4g}" if isinstance(value, float) else f"{key:<32} {value}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
