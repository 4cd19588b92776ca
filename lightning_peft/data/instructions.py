"""Instruction records -> token ids with completion-only labels, optional packing.

A record is ``{"prompt": str, "completion": str}`` or chat ``{"messages": [{"role", "content"}, ...]}``
whose last message is the assistant's answer. Labels are ``-100`` on every prompt token: the boundary
is found by tokenising the prompt part on its own (with ``add_generation_prompt=True`` under a chat
template), never by searching the text for a template string.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "EncodedExample",
    "encode_example",
    "load_records",
    "pack_examples",
    "pad_examples",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The documented template for tokenizers without a chat template (Alpaca-style).
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
TEMPLATES = ("auto", "chat", "plain")


@dataclass(frozen=True)
class EncodedExample:
    """One example: ``input_ids`` and ``labels`` (same length, prompt positions set to ``-100``)."""

    input_ids: list[int]
    labels: list[int]
    prompt_truncated: int = 0  # prompt tokens dropped from the left to fit ``max_length``

    @property
    def prompt_length(self) -> int:
        return sum(1 for t in self.labels if t == IGNORE_INDEX)

    @property
    def completion_tokens(self) -> int:
        """Labels the next-token loss counts: every unmasked one but position 0's, which nothing predicts.

        The same count whether the example is padded into a batch or packed into a row (packing masks each
        example's first label), so a batch's count is the sum over its examples.
        """
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def load_records(source: str | os.PathLike | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records from a list of dicts, a ``.jsonl``/``.json`` file or a ``.csv`` file (columns ``prompt``, ``completion``)."""
    if not isinstance(source, (str, os.PathLike)):
        return [dict(r) for r in source]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data file {str(path)!r} does not exist (expected .jsonl, .json or .csv)")
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        return records
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    if path.suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"instruction data file {str(path)!r}: unknown suffix {path.suffix!r}; use .jsonl, .json or .csv")


def _split_record(record: Mapping[str, Any], index: int) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, completion text) of a record, with clear errors for bad ones."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"record {index}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
        last = messages[-1]
        if not isinstance(last, Mapping) or last.get("role") != "assistant":
            raise ValueError(f"record {index}: the last message must be the assistant's answer (role 'assistant'), got {last!r}")
        prompt = [dict(m) for m in messages[:-1]]
        if not prompt:
            raise ValueError(f"record {index}: 'messages' has no prompt before the assistant's answer")
        completion = last.get("content")
    elif "prompt" in record or "completion" in record:
        missing = [k for k in ("prompt", "completion") if record.get(k) is None]
        if missing:
            raise ValueError(f"record {index}: missing field(s) {missing}; a record needs 'prompt' and 'completion' (or 'messages')")
        prompt = [{"role": "user", "content": str(record["prompt"])}]
        completion = record["completion"]
    else:
        raise ValueError(f"record {index}: needs 'prompt' and 'completion', or 'messages'; got keys {sorted(record)}")
    if not isinstance(completion, str) or not completion.strip():
        raise ValueError(f"record {index}: the completion is empty; every example must have something to learn")
    if not str(prompt[-1].get("content", "")).strip():
        raise ValueError(f"record {index}: the prompt is empty")
    return prompt, completion


def uses_chat_template(tokenizer: Any, template: str = "auto") -> bool:
    """Whether ``template`` (``auto``, ``chat`` or ``plain``) resolves to the tokenizer's chat template."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' but the tokenizer has no chat template; use template='plain' or 'auto'")
    return template == "chat" or (template == "auto" and has_chat)


def _ids(out: Any) -> list[int]:
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
        out = out["input_ids"]
    return list(out)


def prompt_ids(tokenizer: Any, record: Mapping[str, Any], template: str = "auto", system_prompt: str | None = None, index: int = 0) -> list[int]:
    """Token ids of a record's prompt exactly as the model sees it before the answer (what ``generate`` continues)."""
    messages, _ = _split_record(record, index)
    return _encode_prompt(tokenizer, messages, template, system_prompt)


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """``messages`` with ``system_prompt`` put first, unless it is ``None`` or the record has its own system message."""
    if system_prompt is None or messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _encode_prompt(tokenizer: Any, messages: list[dict[str, str]], template: str, system_prompt: str | None) -> list[int]:
    if uses_chat_template(tokenizer, template):
        messages = _with_system(messages, system_prompt)
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    text = "\n\n".join(m["content"] for m in messages if m.get("role") != "system")
    if system_prompt:
        text = f"{system_prompt}\n\n{text}"
    return list(tokenizer(PLAIN_TEMPLATE.format(prompt=text), add_special_tokens=True)["input_ids"])


def encode_example(
    tokenizer: Any,
    record: Mapping[str, Any],
    max_length: int,
    template: str = "auto",
    system_prompt: str | None = None,
    index: int = 0,
) -> EncodedExample:
    """Tokenise one record into ``input_ids`` and completion-only ``labels`` (EOS appended).

    The prompt is truncated from the left when the example is longer than ``max_length`` (the
    completion never is); a completion that alone does not fit is an error naming the record.
    """
    messages, completion = _split_record(record, index)
    prompt = _encode_prompt(tokenizer, messages, template, system_prompt)
    if uses_chat_template(tokenizer, template):
        full = _ids(tokenizer.apply_chat_template([*_with_system(messages, system_prompt), {"role": "assistant", "content": completion}], tokenize=True))
        if full[: len(prompt)] != prompt:
            raise ValueError(
                f"record {index}: the chat template renders the prompt differently with and without the answer, so the "
                "prompt/answer boundary is ambiguous; use template='plain'"
            )
        answer = full[len(prompt) :]
    else:
        answer = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in answer:
        answer.append(eos)
    room = max_length - len(answer)
    if room < 1:
        raise ValueError(
            f"record {index}: the completion alone is {len(answer)} tokens, more than max_length={max_length} allows with a prompt; "
            "raise max_length or shorten the completion (completions are never truncated)"
        )
    dropped = max(0, len(prompt) - room)
    prompt = prompt[dropped:]
    return EncodedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, dropped)


def encode_records(tokenizer: Any, records: Iterable[Mapping[str, Any]], max_length: int, template: str = "auto", system_prompt: str | None = None) -> list[EncodedExample]:
    """:func:`encode_example` over ``records``; logs how many prompts were truncated."""
    examples = [encode_example(tokenizer, r, max_length, template, system_prompt, i) for i, r in enumerate(records)]
    truncated = sum(1 for e in examples if e.prompt_truncated)
    if truncated:
        log.warning("%d of %d prompts were longer than max_length=%d and were truncated from the left", truncated, len(examples), max_length)
    return examples


def pad_examples(examples: Sequence[EncodedExample], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """A batch ``(B, T)`` of ``input_ids``, ``attention_mask`` and ``labels``, padded on ``side``."""
    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        n = width - len(e.input_ids)
        pad = ([pad_id] * n, [0] * n, [IGNORE_INDEX] * n)
        body = (e.input_ids, [1] * len(e.input_ids), e.labels)
        rows = [p + b for p, b in zip(pad, body)] if side == "left" else [b + p for p, b in zip(pad, body)]
        for out, row in zip((ids, mask, labels), rows):
            out.append(row)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def pack_examples(examples: Sequence[EncodedExample], max_length: int, pad_id: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Pack examples into rows of at most ``max_length`` tokens, in order, with no attention across examples.

    Returns ``input_ids``/``labels``/``position_ids`` ``(R, T)`` (positions restart at 0 per example) and an
    additive block-diagonal causal ``attention_mask`` ``(R, 1, T, T)`` (0 where attention is allowed, the
    dtype's minimum elsewhere), so each packed example gives exactly the logits it gives alone.
    """
    rows: list[list[EncodedExample]] = [[]]
    for e in examples:
        if len(e.input_ids) > max_length:
            raise ValueError(f"an example of {len(e.input_ids)} tokens does not fit max_length={max_length}")
        if sum(len(x.input_ids) for x in rows[-1]) + len(e.input_ids) > max_length:
            rows.append([])
        rows[-1].append(e)
    width = max(sum(len(x.input_ids) for x in row) for row in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    allowed = torch.zeros((n, width, width), dtype=torch.bool)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            end = start + len(e.input_ids)
            ids[r, start:end] = torch.tensor(e.input_ids)
            labels[r, start:end] = torch.tensor(e.labels)
            labels[r, start] = IGNORE_INDEX  # never predict an example's first token from the previous example
            positions[r, start:end] = torch.arange(end - start)
            allowed[r, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            start = end
        allowed[r, start:, start:] = torch.eye(width - start, dtype=torch.bool)  # padding attends to itself only
    mask = torch.zeros((n, 1, width, width), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
