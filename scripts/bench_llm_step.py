"""Time LoRA training steps on a causal LM: ours against Hugging Face PEFT, and packed against padded batches.

    python scripts/bench_llm_step.py                       # SmolLM2-135M-Instruct, LoRA r=16 all-linear, batch 4 x 256
    python scripts/bench_llm_step.py --steps 3 --out bench.json

Both LoRA implementations wrap the same base weights and see the same batch (the first headline-task
training examples); the floor is the frozen model's forward and backward (activation gradients only). The
three are timed in turn, step after step, and the medians are reported, so load changes hit all alike.
Packing is compared with our LoRA on the same shorter examples (``--chars`` of each article): padded
batches of ``--batch`` examples against packed rows of ``--length`` tokens, in completion tokens per
second. Prints everything and writes it to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def interleaved_medians(steps: dict[str, object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (a, b, c, a, b, c, ...) so that changes in the
    machine's load affect all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (interleaved; the median is reported)")
    parser.add_argument("--chars", type=int, default=300, help="article characters per example in the packing comparison (shorter examples pack better)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from lightning_peft import CausalLM, LoRAConfig, inject
    from lightning_peft.data.instruction_tasks import bbc_headlines
    from lightning_peft.data.instructions import encode_records, pack_examples, pad_examples
    from lightning_peft.models.causal_lm import completion_loss

    torch.manual_seed(0)
    module = CausalLM(args.model)
    tok = module.tokenizer
    records, _ = bbc_headlines()
    examples = encode_records(tok, records[: args.batch * 8], max_length=args.length)
    padded = pad_examples(examples[: args.batch], tok.pad_token_id)
    padded = {k: v[:, : args.length] for k, v in padded.items()}
    tokens = int(padded["attention_mask"].sum())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def make_step(model, params):
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(batch=padded):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"), use_cache=False).logits
            loss, _ = completion_loss(logits, batch["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    base = module.model
    for p in base.parameters():
        p.requires_grad_(False)

    def frozen_step():
        # The floor: forward and backward through the frozen model (activation gradients only, no optimizer),
        # which is what any adapter needs at least.
        embeds = base.get_input_embeddings()(padded["input_ids"]).detach().requires_grad_()
        logits = base(inputs_embeds=embeds, attention_mask=padded["attention_mask"], use_cache=False).logits
        completion_loss(logits, padded["labels"])[0].backward()
    results: dict[str, object] = {"model": args.model, "batch": args.batch, "length": args.length, "rank": args.rank,
                                  "tokens_per_batch": tokens, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"}
    ours = copy.deepcopy(base)
    inject(ours, LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules=targets, dropout=0.0))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0))
    medians = interleaved_medians({
        "frozen": frozen_step,
        "ours": make_step(ours, [p for p in ours.parameters() if p.requires_grad]),
        "peft": make_step(theirs, [p for p in theirs.parameters() if p.requires_grad]),
    }, args.steps)
    t_frozen, t_ours, t_peft = medians["frozen"], medians["ours"], medians["peft"]
    del ours, theirs

    results.update({
        "frozen_fwd_bwd_s": t_frozen, "lightning_peft_lora_step_s": t_ours, "hf_peft_lora_step_s": t_peft,
        "lightning_peft_tokens_per_s": tokens / t_ours, "hf_peft_tokens_per_s": tokens / t_peft,
        "ours_over_peft_speed": t_peft / t_ours, "ours_over_frozen_time": t_ours / t_frozen,
    })

    # Packed vs padded: the same examples, completion tokens per second.
    lora = copy.deepcopy(base)
    inject(lora, LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules=targets, dropout=0.0))
    step = make_step(lora, [p for p in lora.parameters() if p.requires_grad])
    short_records, _ = bbc_headlines(max_chars=args.chars)
    short = encode_records(tok, short_records[: args.batch * 8], max_length=args.length)
    completion = sum(sum(1 for t in e.labels[1:] if t != -100) for e in short)
    padded_batches = [pad_examples(short[i : i + args.batch], tok.pad_token_id) for i in range(0, len(short), args.batch)]
    packed = pack_examples(short, args.length, tok.pad_token_id)
    packed_batches = [{k: v[i : i + args.batch] for k, v in packed.items()} for i in range(0, packed["input_ids"].shape[0], args.batch)]
    step(padded_batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in padded_batches:
        step(b)
    t_padded = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in packed_batches:
        step(b)
    t_packed = time.perf_counter() - t0
    results.update({"examples": len(short), "padded_rows": sum(b["input_ids"].shape[0] for b in padded_batches), "packed_rows": packed["input_ids"].shape[0],
                    "padded_completion_tokens_per_s": completion / t_padded, "packed_completion_tokens_per_s": completion / t_packed,
                    "packed_over_padded_speed": t_padded / t_packed})
    for key, value in results.items():
        print(f"{key:<34} {value:.4g}" if isinstance(value, float) else f"{key:<34} {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
