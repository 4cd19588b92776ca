"""A LightningDataModule of instruction records for causal-LM supervised fine-tuning."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from ..models.pretrained import load_tokenizer
from .instruction_tasks import INSTRUCTION_TASKS, load_instruction_task
from .instructions import EncodedExample, encode_records, load_records, pack_examples, pad_examples, prompt_ids

__all__ = ["InstructionDataModule", "WindowBatchSampler"]

Source = str | os.PathLike | Sequence[Mapping[str, Any]]


class _Examples(torch.utils.data.Dataset):
    """Items ``(example, prompt_ids, reference, window_tokens)``; an index is ``i`` or ``(i, window_tokens)``."""

    def __init__(self, examples: list[Any]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        i, window = key if isinstance(key, tuple) else (key, None)
        return (*self.examples[i], window)


class WindowBatchSampler(BatchSampler):
    """Batches of ``sampler``'s indices, each index paired with the completion tokens of its accumulation window.

    Lightning steps the optimizer after every ``accumulate`` batches and after an epoch's last batch (the
    ``limit_batches``-th when the trainer limits them, resolved as Lightning does), so this groups the
    batches the same way and yields ``[(index, window_tokens), ...]``, where ``window_tokens`` is the sum of
    ``tokens[index]`` over every index of the window (the last window of an epoch may be shorter).
    :class:`~lightning_peft.CausalLM` divides each micro-batch's loss sum by it, so the accumulated gradient
    is the gradient of the mean over every completion token of the window. It subclasses ``BatchSampler``
    and takes ``sampler`` so Lightning can re-create it around a ``DistributedSampler`` under DDP: each
    rank then counts its own windows, and ``CausalLM`` sums the counts over ranks. A resume in the middle
    of an epoch (Lightning restarts a plain loader's epoch there) keeps windows aligned when the checkpoint
    was written after an optimizer step, except that epoch's last window when its length is not a multiple
    of ``accumulate``.

    Example:
        >>> batches = WindowBatchSampler(SequentialSampler(range(5)), 2, False, tokens=[1, 2, 3, 4, 5], accumulate=2)
        >>> list(batches)
        [[(0, 10), (1, 10)], [(2, 10), (3, 10)], [(4, 5)]]
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        tokens: Sequence[int],
        accumulate: int = 1,
        limit_batches: int | float = 1.0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be a positive integer (Trainer(accumulate_grad_batches)), got {accumulate!r}")
        self.tokens, self.accumulate, self.limit_batches = tokens, accumulate, limit_batches

    def _epoch_batches(self) -> int:
        """Batches Lightning takes per epoch: ``len(self)`` cut by ``limit_batches`` (an int, or a float share)."""
        n = len(self)
        return min(n, self.limit_batches) if isinstance(self.limit_batches, int) else int(n * self.limit_batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches, done, end = super().__iter__(), 0, self._epoch_batches()
        while window := list(itertools.islice(batches, min(self.accumulate, end - done) if done < end else self.accumulate)):
            total = sum(self.tokens[i] for batch in window for i in batch)
            for batch in window:
                yield [(i, total) for i in batch]
            done += len(window)


def _collate(items: list[tuple[EncodedExample, list[int] | None, str | None, int | None]], pad_id: int, packing: bool, max_length: int) -> dict[str, Any]:
    examples = [e for e, _, _, _ in items]
    batch = pack_examples(examples, max_length, pad_id) if packing else pad_examples(examples, pad_id)
    window = items[0][3]
    if window is not None:  # from WindowBatchSampler: the completion tokens of this batch's accumulation window
        batch["window_tokens"] = torch.tensor(window)
    gen = [(p, r) for _, p, r, _ in items if p is not None]
    if gen:  # validation: the prompts alone, left-padded, for generation, and their reference answers
        prompts = pad_examples([EncodedExample(p, p) for p, _ in gen], pad_id, side="left")
        batch["prompt_ids"] = prompts["input_ids"]
        batch["prompt_mask"] = prompts["attention_mask"]
        batch["references"] = [r for _, r in gen]
    return batch


class InstructionDataModule(pl.LightningDataModule):
    """Train/validation loaders of instruction examples with completion-only labels.

    Training batches hold ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)`` (``-100`` on prompt
    and padding); with ``packing=True`` several examples share a row, with ``position_ids`` and a 4-D
    block-diagonal ``attention_mask`` ``(B, 1, T, T)``. Training batches also carry ``window_tokens`` (a
    scalar tensor): the completion tokens of the batch's gradient-accumulation window, read from the
    trainer's ``accumulate_grad_batches`` (see :class:`WindowBatchSampler`), so that
    :class:`~lightning_peft.CausalLM` averages its loss over the window. Validation batches also carry the left-padded
    prompts (``prompt_ids``, ``prompt_mask``) and the reference answers (``references``) of the first
    ``generate_size`` validation examples, for generation-based metrics.

    Args:
        tokenizer: tokenizer name or path (usually the model's), or a loaded tokenizer.
        train: records (list of dicts), a ``.jsonl``/``.json``/``.csv`` file, or a built-in task name
            (``bbc_headlines``, ``bbc_topics``), which also provides the validation records.
        val: validation records or file; default: ``val_fraction`` of ``train`` held out.
        max_length: tokens per example (per row when packing); prompts are truncated from the left.
        template: ``auto`` (the tokenizer's chat template when it has one), ``chat`` or ``plain``.
        system_prompt: a system message put before chat prompts (``None``: the template's default).
        packing: pack training examples into rows of ``max_length`` tokens.
        train_size / val_size: keep only this many examples, for quick runs.
        generate_size: validation examples whose answers are generated and scored (0: none).
        shuffle: reshuffle the training examples every epoch.
        train_prompts: also give training batches ``prompt_ids``/``prompt_mask``/``references``, for methods
            that generate during training (:class:`~lightning_peft.GRPO`).
    """

    def __init__(
        self,
        tokenizer: str | Any,
        train: Source = "bbc_headlines",
        val: Source | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        template: str = "auto",
        system_prompt: str | None = None,
        packing: bool = False,
        val_fraction: float = 0.2,
        train_size: int | None = None,
        val_size: int | None = None,
        generate_size: int = 16,
        split_seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        train_prompts: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("train_size", train_size), ("val_size", val_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.tokenizer_name = tokenizer
        self.train_source, self.val_source = train, val
        self.max_length, self.batch_size = max_length, batch_size
        self.template, self.system_prompt, self.packing = template, system_prompt, packing
        self.val_fraction, self.train_size, self.val_size = val_fraction, train_size, val_size
        self.generate_size, self.split_seed, self.num_workers, self.shuffle = generate_size, split_seed, num_workers, shuffle
        self.train_prompts = train_prompts
        self.tokenizer: Any = None
        self.train_records: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []

    def _records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if isinstance(self.train_source, str) and self.train_source in INSTRUCTION_TASKS:
            train, val = load_instruction_task(self.train_source, val_fraction=self.val_fraction, seed=self.split_seed)
        else:
            train = load_records(self.train_source)
            if self.val_source is None:
                order = list(range(len(train)))
                random.Random(self.split_seed).shuffle(order)
                n_val = max(1, round(len(train) * self.val_fraction))
                val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
            else:
                val = []
        if self.val_source is not None:
            val = load_records(self.val_source)
        if not train:
            raise ValueError("no training records")
        return train[: self.train_size], val[: self.val_size]

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name) if isinstance(self.tokenizer_name, str) else self.tokenizer_name
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.train_records, self.val_records = self._records()
        encode = partial(
            encode_records, self.tokenizer, max_length=self.max_length, template=self.template, system_prompt=self.system_prompt
        )
        self._train = encode(self.train_records)
        self._train_prompts = (
            [
                (prompt_ids(self.tokenizer, r, self.template, self.system_prompt, i)[-self.max_length :], self._reference(r))
                for i, r in enumerate(self.train_records)
            ]
            if self.train_prompts
            else []
        )
        val = encode(self.val_records)
        gen = [
            (prompt_ids(self.tokenizer, r, self.template, self.system_prompt, i)[-self.max_length :], self._reference(r))
            for i, r in enumerate(self.val_records[: self.generate_size])
        ]
        # Generation targets ride along with the first generate_size validation examples.
        self._val = [(e, *gen[i]) if i < len(gen) else (e, None, None) for i, e in enumerate(val)]

    @staticmethod
    def _reference(record: Mapping[str, Any]) -> str:
        return record["messages"][-1]["content"] if "messages" in record else str(record["completion"])

    def _collate(self, packing: bool) -> Any:
        return partial(_collate, pad_id=self.tokenizer.pad_token_id, packing=packing, max_length=self.max_length)

    def _loader(self, items: list[Any], shuffle: bool, packing: bool) -> DataLoader:
        return DataLoader(_Examples(items), batch_size=self.batch_size, shuffle=shuffle, collate_fn=self._collate(packing), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Batches that also carry ``window_tokens``, the completion tokens of their accumulation window (:class:`WindowBatchSampler`)."""
        if self.train_prompts:  # the prompts ride along, left-padded, for generation during training
            items = _Examples([(e, *g) for e, g in zip(self._train, self._train_prompts)])
        else:
            items = _Examples([(e, None, None) for e in self._train])
        trainer = self.trainer  # None outside a Trainer: every batch is its own window
        batches = WindowBatchSampler(
            RandomSampler(items) if self.shuffle else SequentialSampler(items), self.batch_size, drop_last=False,
            tokens=[e.completion_tokens for e in self._train], accumulate=trainer.accumulate_grad_batches if trainer else 1,
            limit_batches=trainer.limit_train_batches if trainer else 1.0,
        )
        return DataLoader(items, batch_sampler=batches, collate_fn=self._collate(self.packing), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        # Generation needs the examples in batches of their own (with prompts) and the rest without.
        with_gen = [item for item in self._val if item[1] is not None]
        without = [item for item in self._val if item[1] is None]
        return self._loader(with_gen + without, shuffle=False, packing=False) if self._val else []
