"""Fold a saved adapter into its base model and write a plain ``transformers`` folder, checked by reloading it.

The folder (config, safetensors weights, tokenizer) loads with ``AutoModelForCausalLM.from_pretrained`` and in
tools that know nothing of adapters (vLLM, llama.cpp's converter, ``scripts/generate.py --model``). After
writing, the script reloads the folder and compares its logits on a probe prompt with base + adapter, and
exits with an error when they differ by more than rounding.

Examples:
    python scripts/merge_adapter.py --adapter outputs/smollm2_headlines/runs/<time>/adapter --out merged/headlines
    python scripts/merge_adapter.py --model path/to/model --adapter hf_peft_adapter_dir --out merged/x --dtype bfloat16

``--adapter`` takes what ``scripts/generate.py`` takes: a ``save_adapter`` folder, a Hugging Face PEFT folder, or
a Lightning checkpoint saved with the ``PEFT`` callback. LoRA (and its variants), IA3 and BitFit merge; a QLoRA
adapter merges into the dequantized base (bf16 unless ``--dtype``); bottleneck adapters and prompt methods
cannot be merged and are refused with the reason.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROBE = "Write a short headline for this news article. Shares in the car maker rose after it reported record sales."
DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"the base model the adapter was trained on (default: {DEFAULT_MODEL})")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the model's)")
    parser.add_argument("--adapter", required=True, help="adapter folder (ours or HF PEFT's) or Lightning checkpoint")
    parser.add_argument("--out", required=True, help="folder to write the merged model into")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the saved weights (default: the model's; bfloat16 for a QLoRA base)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        sys.exit(f"error: {out} already holds files; pass --overwrite to replace it")

    import torch
    from transformers import AutoModelForCausalLM

    from lightning_peft import CausalLM, load_adapter, save_merged_model
    from lightning_peft.peft.functional import adapter_parameters
    from lightning_peft.utils.param_count import count_parameters

    module = CausalLM(args.model, tokenizer=args.tokenizer).eval()
    name = load_adapter(module, args.adapter)
    size = sum(p.numel() for p in adapter_parameters(module, [name]).values())
    print(f"adapter {name!r} loaded from {args.adapter} ({size:,} adapter parameters)", file=sys.stderr)
    probe = module.tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = module.model(input_ids=probe).logits.float()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        save_merged_model(module, out, dtype=dtype, overwrite=args.overwrite)
    except (RuntimeError, FileExistsError, NotADirectoryError) as error:
        sys.exit(f"error: {error}")

    weights_dtype = str(next(module.model.parameters()).dtype).replace("torch.", "")  # as saved
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # only the saved weights' rounding counts
    with torch.no_grad():
        after = reloaded(input_ids=probe).logits.float()
    difference = float((after - before).abs().max())
    relative = float((after - before).norm() / before.norm())
    same_argmax = int((after.argmax(-1) == before.argmax(-1)).sum())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())  # bytes on disk
    print(f"merged model written to {out} ({size / 2**20:,.1f} MiB, {weights_dtype}, {count_parameters(reloaded).total:,} parameters)")
    print(f"reloaded with AutoModelForCausalLM: max |logit difference| to base + adapter {difference:.3g} "
          f"(relative {relative:.2g}) on a {probe.shape[1]}-token probe; next-token argmax equal at {same_argmax}/{probe.shape[1]} positions")
    tolerance = 1e-4 if weights_dtype == "float32" else 2e-2
    if relative > tolerance:
        sys.exit(f"error: the reloaded model's logits differ from base + adapter by {relative:.2g} (relative), more than "
                 f"{weights_dtype} rounding ({tolerance:g}); the merge did not reproduce the adapter")
    print(f"use it: AutoModelForCausalLM.from_pretrained({str(out)!r}), or python scripts/generate.py --model {out} --prompt ...")


if __name__ == "__main__":
    main()
