"""Preference records ``{"prompt", "chosen", "rejected"}`` -> token ids of both completions after one shared prompt.

The prompt is a string or a chat history (a list of ``{"role", "content"}`` ending with the user's turn); it is
templated and masked exactly as :mod:`lightning_peft.data.instructions` does for SFT, so the DPO model reads its
prompts the way it was fine-tuned on them. Chosen and rejected share the same (left-truncated) prompt tokens;
completions are never truncated. Records may carry precomputed reference log-probabilities
(``ref_chosen_logps``, ``ref_rejected_logps``: summed over each completion's tokens, EOS included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.instructions import IGNORE_INDEX, EncodedExample, encode_example, pad_examples

__all__ = ["REF_KEYS", "EncodedPair", "as_sft_record", "check_preference_record", "collate_pairs", "encode_pair", "encode_pairs"]

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
_UNLIMITED = 1 << 30


@dataclass(frozen=True)
class EncodedPair:
    """One pair: the chosen and rejected examples (same prompt ids), and optional reference log-probs."""

    chosen: EncodedExample
    rejected: EncodedExample
    ref_logps: tuple[float, float] | None = None
    prompt_truncated: int = 0


def check_preference_record(record: Mapping[str, Any], index: int) -> None:
    """Raise a ``ValueError`` naming the record and the problem: missing fields, empty or identical completions."""
    if not isinstance(record, Mapping):
        raise ValueError(f"record {index}: expected a dict with 'prompt', 'chosen' and 'rejected', got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if record.get(k) is None]
    if missing:
        raise ValueError(
            f"record {index}: missing field(s) {missing}; a preference record needs 'prompt', 'chosen' and 'rejected' (got keys {sorted(record)})"
        )
    for key in ("chosen", "rejected"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"record {index}: '{key}' is empty; both completions must be non-empty strings")
    if record["chosen"].strip() == record["rejected"].strip():
        raise ValueError(
            f"record {index}: 'chosen' and 'rejected' are identical ({record['chosen'][:60]!r}); such a pair teaches nothing, drop it"
        )
    present = [k for k in REF_KEYS if record.get(k) is not None]
    if present and len(present) != 2:
        raise ValueError(f"record {index}: has {present[0]!r} but not the other; give both of {list(REF_KEYS)} or neither")
    for k in present:
        value = record[k]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"record {index}: {k!r} must be a finite number (a summed log-probability), got {value!r}")


def as_sft_record(record: Mapping[str, Any], completion: str) -> dict[str, Any]:
    """The SFT record (``prompt``/``completion`` or chat ``messages``) of a preference record's prompt and one completion."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": completion}
    return {"messages": [*prompt, {"role": "assistant", "content": completion}]}


def encode_pair(
    tokenizer: Any, record: Mapping[str, Any], max_length: int, template: str = "auto", system_prompt: str | None = None, index: int = 0
) -> EncodedPair:
    """Tokenise a preference record: prompt + chosen and prompt + rejected, each at most ``max_length`` tokens.

    Both rows keep the same prompt tokens: the prompt is cut from the left until the longer completion fits;
    a completion that alone does not fit is an error naming the record.
    """
    check_preference_record(record, index)
    encoded = [
        encode_example(tokenizer, as_sft_record(record, record[k]), _UNLIMITED, template, system_prompt, index)
        for k in ("chosen", "rejected")
    ]
    prompts = [e.input_ids[: e.prompt_length] for e in encoded]
    if prompts[0] != prompts[1]:
        raise ValueError(
            f"record {index}: the template renders the prompt differently before 'chosen' and 'rejected'; use template='plain'"
        )
    answers = [e.input_ids[e.prompt_length :] for e in encoded]
    longest = max(len(a) for a in answers)
    if longest >= max_length:
        raise ValueError(
            f"record {index}: a completion alone is {longest} tokens, more than max_length={max_length} allows with a prompt; "
            "raise max_length or shorten the completions (completions are never truncated)"
        )
    dropped = max(0, len(prompts[0]) - (max_length - longest))
    prompt = prompts[0][dropped:]
    chosen, rejected = (EncodedExample(prompt + a, [IGNORE_INDEX] * len(prompt) + a) for a in answers)
    refs = (float(record[REF_KEYS[0]]), float(record[REF_KEYS[1]])) if record.get(REF_KEYS[0]) is not None else None
    return EncodedPair(chosen, rejected, refs, dropped)


def encode_pairs(
    tokenizer: Any, records: Iterable[Mapping[str, Any]], max_length: int, template: str = "auto", system_prompt: str | None = None
) -> list[EncodedPair]:
    """:func:`encode_pair` over ``records``; precomputed reference log-probs must be in all records or in none."""
    pairs = [encode_pair(tokenizer, r, max_length, template, system_prompt, i) for i, r in enumerate(records)]
    with_refs = sum(p.ref_logps is not None for p in pairs)
    if 0 < with_refs < len(pairs):
        first = next(i for i, p in enumerate(pairs) if p.ref_logps is None)
        raise ValueError(
            f"{with_refs} of {len(pairs)} records carry {list(REF_KEYS)} but record {first} does not; give them for all records or none"
        )
    return pairs


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of ``2B`` rows, chosen rows first: ``input_ids``, ``attention_mask``, ``labels`` ``(2B, T)``.

    Plus ``ref_chosen_logps`` and ``ref_rejected_logps`` ``(B,)`` (float32) when the records carry them.
    """
    batch = pad_examples([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if pairs[0].ref_logps is not None:
        refs = torch.tensor([p.ref_logps for p in pairs], dtype=torch.float32)
        batch[REF_KEYS[0]], batch[REF_KEYS[1]] = refs[:, 0], refs[:, 1]
    return batch
