"""Answer prompts with a causal LM, optionally with a saved adapter: what you run right after training.

Examples:
    python scripts/generate.py --prompt "What is the capital of France?"
    python scripts/generate.py --adapter outputs/train/runs/<time>/adapter --file prompts.txt
    python scripts/generate.py --model path/to/model --adapter hf_peft_adapter_dir --prompt "Hi" --max-new-tokens 64

``--adapter`` takes a folder written by ``save_adapter`` or the ``PEFT`` callback, a folder in Hugging Face
PEFT's layout, or a Lightning checkpoint saved with the ``PEFT`` callback. ``--file`` reads one prompt per
line from a ``.txt`` file, or ``{"prompt": ...}`` records from a ``.jsonl`` file. Answers are greedy unless
``--temperature`` is above 0 (sampling, with ``--top-p``/``--top-k``; ``--seed`` makes it repeatable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            sys.exit(f"error: --file {path} does not exist")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts += [json.loads(line)["prompt"] for line in lines] if path.suffix == ".jsonl" else lines
    if not prompts:
        sys.exit("error: give at least one --prompt or a --file of prompts")
    return prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default: {DEFAULT_MODEL}, packaged offline)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the model's)")
    parser.add_argument("--adapter", default=None, help="adapter folder (ours or HF PEFT's) or Lightning checkpoint")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--file", default=None, help="prompts, one per line (.txt) or {'prompt': ...} per line (.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--template", choices=("auto", "chat", "plain"), default="auto", help="prompt template (default: the chat template when the tokenizer has one)")
    parser.add_argument("--system-prompt", default=None, help="system message for chat templates")
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens with this much probability")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        parser.error("--temperature must be >= 0, --top-p in (0, 1] and --top-k >= 0")
    prompts = read_prompts(args)

    import torch

    from lightning_peft import CausalLM, load_adapter
    from lightning_peft.data.instructions import EncodedExample, pad_examples, prompt_ids

    module = CausalLM(args.model, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens)
    if args.adapter:
        name = load_adapter(module, args.adapter)
        print(f"adapter {name!r} loaded from {args.adapter}", file=sys.stderr)
    module.eval()
    tokenizer = module.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = [prompt_ids(tokenizer, {"prompt": p, "completion": "-"}, args.template, args.system_prompt, i) for i, p in enumerate(prompts)]
    batch = pad_examples([EncodedExample(p, p) for p in ids], tokenizer.pad_token_id, side="left")
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k} if args.temperature > 0 else {}
    torch.manual_seed(args.seed)
    with torch.no_grad():
        answers = module.generate(batch["input_ids"], batch["attention_mask"], **sampling)
    for prompt, answer in zip(prompts, answers):
        if args.json:
            print(json.dumps({"prompt": prompt, "generated": answer}, ensure_ascii=False))
        else:
            print(f">>> {prompt}\n{answer}\n")


if __name__ == "__main__":
    main()
