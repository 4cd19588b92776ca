"""Time a LoRA training step on the default text encoder: ours against Hugging Face PEFT and the frozen floor.

    python scripts/bench_encoder_step.py                 # all-MiniLM-L6-v2, LoRA r=8 on query/value, batch 16 x 128
    python scripts/bench_encoder_step.py --out docs/results/kernels/encoder_step_cpu.json

All three see the same batch of BBC News articles and a 5-class head on mean-pooled states. The floor is the
frozen encoder's forward and backward (activation gradients only: what any adapter needs at least). Ours and
HF PEFT wrap the same weights with the same LoRA and train adapter and head with AdamW. The steps are timed in
turn (floor, ours, PEFT, floor, ...) and medians reported, so a change in the machine's load hits all alike;
the ratios are the result. Memory, from one more step of each after the timing: the peak bytes of the tensors
the step allocates (``track_tensor_memory``: weights, inputs and optimizer state existed before and do not
count; a CPU has no allocator statistics and one process holds all three models) and the bytes autograd
saves for backward (``count_saved_bytes``, parameters left out).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm_step import interleaved_medians


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per mode (interleaved; medians)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from lightning_peft import LoRAConfig, inject, load_backbone, load_tokenizer
    from lightning_peft.data.datasets import load_bbc_news
    from lightning_peft.utils.saved_memory import count_saved_bytes
    from lightning_peft.utils.tensor_memory import track_tensor_memory

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    encoder = load_backbone(args.model).train()
    for p in encoder.parameters():
        p.requires_grad_(False)
    data = load_bbc_news()
    batch = tok(data.texts[: args.batch], padding="max_length", truncation=True, max_length=args.length, return_tensors="pt")
    labels = torch.tensor(data.labels[: args.batch])
    mask = batch["attention_mask"].unsqueeze(-1).float()
    targets = args.targets.split(",")

    def pooled(model, **inputs):
        return (model(attention_mask=batch["attention_mask"], **inputs).last_hidden_state * mask).sum(1) / mask.sum(1)

    def trainer_step(model):
        head = torch.nn.Linear(encoder.config.hidden_size, 5)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-4)

        def step():
            F.cross_entropy(head(pooled(model, input_ids=batch["input_ids"])), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    frozen_head = torch.nn.Linear(encoder.config.hidden_size, 5).requires_grad_(False)

    def frozen_step():
        embeds = encoder.embeddings.word_embeddings(batch["input_ids"]).detach().requires_grad_()
        F.cross_entropy(frozen_head(pooled(encoder, inputs_embeds=embeds)), labels).backward()

    ours = copy.deepcopy(encoder)
    inject(ours, LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules=targets, dropout=0.0))
    theirs = get_peft_model(copy.deepcopy(encoder), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0))
    models = {"frozen": encoder, "ours": ours, "peft": theirs}
    steps = {"frozen": frozen_step, "ours": trainer_step(ours), "peft": trainer_step(theirs)}
    medians = interleaved_medians(steps, args.steps)
    mib = {}
    for name, step in steps.items():  # after the timed steps: AdamW's state exists, as in any later step
        with track_tensor_memory() as mem, count_saved_bytes(exclude=list(models[name].parameters())) as saved:
            step()
        mib[name] = {"peak": mem.peak / 2**20, "saved": saved.bytes / 2**20}
    results: dict[str, object] = {
        "model": args.model, "batch": args.batch, "length": args.length, "rank": args.rank, "targets": targets,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "frozen_fwd_bwd_s": medians["frozen"], "lightning_peft_lora_step_s": medians["ours"], "hf_peft_lora_step_s": medians["peft"],
        "ours_over_frozen_time": medians["ours"] / medians["frozen"], "peft_over_frozen_time": medians["peft"] / medians["frozen"],
        "ours_over_peft_speed": medians["peft"] / medians["ours"],
        "frozen_step_peak_MiB": mib["frozen"]["peak"], "lightning_peft_step_peak_MiB": mib["ours"]["peak"],
        "hf_peft_step_peak_MiB": mib["peft"]["peak"], "ours_over_peft_peak": mib["ours"]["peak"] / mib["peft"]["peak"],
        "ours_over_frozen_peak": mib["ours"]["peak"] / mib["frozen"]["peak"],
        "frozen_saved_MiB": mib["frozen"]["saved"], "lightning_peft_saved_MiB": mib["ours"]["saved"],
        "hf_peft_saved_MiB": mib["peft"]["saved"],
    }
    for key, value in results.items():
        print(f"{key:<30} {value:.4g}" if isinstance(value, float) else f"{key:<30} {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
