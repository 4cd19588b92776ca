"""SPIN-style preference pairs from the BBC headline task: the true headline is chosen, the model's own greedy one rejected.

    python scripts/make_dpo_pairs.py                                   # base SmolLM2-135M-Instruct, 200 articles
    python scripts/make_dpo_pairs.py --adapter outputs/.../adapter     # the SFT model (base + a saved adapter)
    python scripts/train.py experiment=smollm2_dpo peft=lora 'peft.target_modules=all-linear' peft.lr=5e-5

The pairs are written atomically to ``--out`` (JSONL of ``{"prompt", "chosen", "rejected"}``) with a sidecar
``<out>.meta.json`` holding a fingerprint of the model that produced them (weights, adapter included, and the
generation settings). A later call with the same fingerprint reuses the file; any other model or setting
regenerates it. Articles whose greedy headline equals the true one (case-insensitive) teach nothing and are
dropped, as are empty answers; both counts are printed and kept in the sidecar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_OUT = "data/dpo/bbc_headlines_pairs.jsonl"


def make_pairs(records: Sequence[Mapping[str, str]], answers: Sequence[str]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Pairs ``{prompt, chosen: the record's completion, rejected: the answer}``, dropping answers that are empty or
    equal the truth (case-insensitive, surrounding space ignored); returns the pairs and the counts dropped."""
    pairs, dropped = [], {"equal_to_truth": 0, "empty": 0}
    for record, answer in zip(records, answers, strict=True):
        truth = record["completion"]
        if not answer.strip():
            dropped["empty"] += 1
        elif answer.strip().casefold() == truth.strip().casefold():
            dropped["equal_to_truth"] += 1
        else:
            pairs.append({"prompt": record["prompt"], "chosen": truth, "rejected": answer.strip()})
    return pairs, dropped


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def cached(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The sidecar of ``out`` when both files exist and it was made by the model with ``fingerprint``."""
    meta = meta_path(out)
    if not (out.is_file() and meta.is_file()):
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return data if data.get("fingerprint") == fingerprint else None


def generate_answers(module: Any, records: Sequence[Mapping[str, str]], args: argparse.Namespace) -> list[str]:
    """Greedy answers of ``module`` (a CausalLM) to the records' prompts, in batches of ``args.batch_size``."""
    import torch

    from lightning_peft.data.instructions import EncodedExample, pad_examples, prompt_ids

    tokenizer = module.tokenizer
    answers: list[str] = []
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        ids = [
            prompt_ids(tokenizer, r, args.template, args.system_prompt, start + i)[-args.max_prompt_tokens :] for i, r in enumerate(chunk)
        ]
        batch = pad_examples([EncodedExample(p, p) for p in ids], tokenizer.pad_token_id, side="left")
        with torch.no_grad():
            answers += module.generate(batch["input_ids"], batch["attention_mask"])
        print(f"  {len(answers)}/{len(records)} answers", file=sys.stderr, flush=True)
    return answers


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default: {DEFAULT_MODEL}, packaged offline)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the model's)")
    parser.add_argument(
        "--adapter", default=None, help="a saved adapter folder (ours or HF PEFT's) or a Lightning checkpoint: base + adapter answers"
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"JSONL of pairs (default: {DEFAULT_OUT}); its fingerprint goes to <out>.meta.json"
    )
    parser.add_argument(
        "--num-articles", type=int, default=200, help="articles of the task's training split to answer (pairs: fewer, see dropped)"
    )
    parser.add_argument("--offset", type=int, default=0, help="first article of the training split")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-prompt-tokens", type=int, default=360, help="prompts are cut from the left to this many tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--template", choices=("auto", "chat", "plain"), default="auto")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--force", action="store_true", help="regenerate even when the cache matches")
    args = parser.parse_args(argv)
    if args.num_articles < 1 or args.offset < 0:
        parser.error("--num-articles must be >= 1 and --offset >= 0")

    from lightning_peft import CausalLM, load_adapter
    from lightning_peft.data.instruction_tasks import bbc_headlines
    from lightning_peft.utils.atomic_files import atomic_write_json, atomic_write_text
    from lightning_peft.utils.fingerprint import module_fingerprint

    module = CausalLM(args.model, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens)
    if args.adapter:
        print(f"adapter {load_adapter(module, args.adapter)!r} loaded from {args.adapter}", file=sys.stderr)
    module.eval()
    if module.tokenizer.pad_token_id is None:
        module.tokenizer.pad_token = module.tokenizer.eos_token
    settings = {
        "task": "bbc_headlines",
        "num_articles": args.num_articles,
        "offset": args.offset,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "template": args.template,
        "system_prompt": args.system_prompt,
        "tokenizer": args.tokenizer or args.model,
    }
    fingerprint = module_fingerprint(module.model, extra=settings)
    out = Path(args.out)
    meta = None if args.force else cached(out, fingerprint)
    if meta is not None:
        print(f"reused {out}: {meta['pairs']} pairs made by the same model and settings (fingerprint {fingerprint[:12]})")
        return meta

    train, _ = bbc_headlines()
    records = train[args.offset : args.offset + args.num_articles]
    answers = generate_answers(module, records, args)
    pairs, dropped = make_pairs(records, answers)
    meta_path(out).unlink(missing_ok=True)  # a crash below leaves no sidecar, so the file is never taken as current
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    meta = {
        "fingerprint": fingerprint,
        "model": args.model,
        "adapter": args.adapter,
        "settings": settings,
        "articles": len(records),
        "pairs": len(pairs),
        "dropped": dropped,
    }
    atomic_write_json(meta_path(out), meta)
    print(
        f"wrote {out}: {len(pairs)} pairs from {len(records)} articles; dropped {dropped['equal_to_truth']} whose greedy headline "
        f"equals the true one and {dropped['empty']} empty answers"
    )
    return meta


if __name__ == "__main__":
    main()
