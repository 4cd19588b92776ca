"""Base-weight memory of QLoRA's quantized bases against bf16, on a model of realistic size.

Builds a Llama-architecture model (default: TinyLlama-1.1B's shape, random weights -- memory does
not depend on the values), quantizes its linear layers the way ``QLoRAConfig`` does (NF4 with and
without double quantization, FP4, int8) and prints the storage of those weights next to bf16, plus
the whole model's parameter memory. Runs on CPU (a few minutes) or CUDA; ``--out`` writes JSON.

    python scripts/bench_qlora_memory.py                      # TinyLlama-1.1B shape
    python scripts/bench_qlora_memory.py --layers 4           # quicker: the first 4 blocks only
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 512), tie_word_embeddings=False,
    )
    device = args.device
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def parameter_bytes(model: torch.nn.Module) -> int:
    from lightning_peft.peft.quantization import _storage_bytes, is_quantized

    quantized = [m for m in model.modules() if is_quantized(m)]
    inside = {id(p) for m in quantized for p in m.parameters(recurse=False)}
    plain = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    return plain + sum(_storage_bytes(m) + (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0) for m in quantized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder blocks (TinyLlama-1.1B has 22)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    from lightning_peft import QLoRAConfig, base_weight_memory
    from lightning_peft.peft.qlora import prepare_qlora
    from lightning_peft.peft.targeting import all_linear_modules

    variants = {
        "nf4 + double quant": QLoRAConfig(bits=4, quant_type="nf4", double_quant=True),
        "nf4": QLoRAConfig(bits=4, quant_type="nf4", double_quant=False),
        "fp4 + double quant": QLoRAConfig(bits=4, quant_type="fp4", double_quant=True),
        "int8": QLoRAConfig(bits=8),
    }
    rows = []
    reference = build(args)
    linear = all_linear_modules(reference)
    linear_params = sum(reference.get_submodule(n).weight.numel() for n in linear)
    total_bf16 = parameter_bytes(reference)
    rows.append({"base": "bf16", "linear_weights_MiB": 2 * linear_params / 2**20, "ratio": 1.0, "model_MiB": total_bf16 / 2**20, "seconds": 0.0})
    del reference
    for name, config in variants.items():
        gc.collect()
        model = build(args)
        start = time.perf_counter()
        prepare_qlora(model, config, [])
        seconds = time.perf_counter() - start
        memory = base_weight_memory(model)
        assert memory.parameters == linear_params, (memory.parameters, linear_params)
        rows.append({"base": name, "linear_weights_MiB": memory.quantized_bytes / 2**20, "ratio": memory.ratio,
                     "model_MiB": parameter_bytes(model) / 2**20, "seconds": seconds})
        del model
    header = f"{'base':<20} {'linear weights':>15} {'vs bf16':>8} {'whole model':>12} {'quantize':>9}"
    print(f"Llama-architecture model, {args.layers} blocks (hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}), "
          f"{linear_params / 1e9:.3f}B linear weights in {len(linear)} layers; {args.device}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['base']:<20} {r['linear_weights_MiB']:>11.1f} MiB {r['ratio']:>7.3f}x {r['model_MiB']:>8.1f} MiB {r['seconds']:>8.1f}s")
    if args.out:
        meta = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab, "device": args.device, "linear_weights": linear_params, "torch": torch.__version__,
                "machine": platform.processor() or platform.machine()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
