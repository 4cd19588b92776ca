"""A LightningDataModule of preference pairs for DPO: records, files and splits as in ``InstructionDataModule``."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from ..data.instruction_datamodule import InstructionDataModule, Source, _Examples
from ..data.instruction_tasks import INSTRUCTION_TASKS
from ..data.instructions import EncodedExample, pad_examples, prompt_ids
from ..models.pretrained import load_tokenizer
from .preference_data import EncodedPair, as_sft_record, collate_pairs, encode_pairs

__all__ = ["PreferenceDataModule"]


def _collate(items: list[tuple[EncodedPair, list[int] | None, str | None, int | None]], pad_id: int) -> dict[str, Any]:
    """Items as the instruction data's ``_Examples`` gives them: ``(pair, prompt_ids, reference, window_tokens)``."""
    batch: dict[str, Any] = collate_pairs([item[0] for item in items], pad_id)
    gen = [(item[1], item[2]) for item in items if item[1] is not None]
    if gen:  # validation: the prompts alone, left-padded, and the chosen answers as references (CausalLM scores them)
        prompts = pad_examples([EncodedExample(p, p) for p, _ in gen], pad_id, side="left")
        batch["prompt_ids"], batch["prompt_mask"] = prompts["input_ids"], prompts["attention_mask"]
        batch["references"] = [r for _, r in gen]
    return batch


class PreferenceDataModule(InstructionDataModule):
    """Train/validation loaders of preference pairs, ``B`` pairs per batch as ``2B`` rows (chosen rows first).

    Batches hold ``input_ids``, ``attention_mask`` and ``labels`` ``(2B, T)`` (``-100`` on prompt and padding),
    and ``ref_chosen_logps``/``ref_rejected_logps`` ``(B,)`` when the records carry them. The first
    ``generate_size`` validation batches also carry their prompts (``prompt_ids``, ``prompt_mask``) and the
    chosen answers (``references``) for greedy generation scored by ROUGE-L.

    Bad records are errors naming the record (missing field, empty completion, chosen identical to rejected),
    never silent drops: a pair generator should drop such pairs itself and say how many
    (``scripts/make_dpo_pairs.py`` does).

    Args:
        tokenizer: tokenizer name or path (usually the model's), or a loaded tokenizer.
        train: records (list of dicts), or a ``.jsonl``/``.json``/``.csv`` file of ``{"prompt", "chosen", "rejected"}``.
        val: validation records or file; default: ``val_fraction`` of ``train`` held out.
        max_length: tokens per row (prompt + one completion); prompts are truncated from the left, shared by both rows.
        batch_size: pairs per batch.
        template / system_prompt: prompt templating, as in :class:`~lightning_peft.InstructionDataModule`.
        generate_size: validation pairs whose prompts are answered greedily and scored against ``chosen`` (0: none).

    Example:
        >>> from lightning_peft import load_tokenizer
        >>> tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
        >>> records = [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no no"} for i in range(10)]
        >>> dm = PreferenceDataModule(tok, train=records, max_length=32, batch_size=4, template="plain")
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> tuple(batch["input_ids"].shape), len(dm.train_records), len(dm.val_records)
        ((8, 17), 8, 2)
    """

    def __init__(
        self,
        tokenizer: str | Any,
        train: Source,
        val: Source | None = None,
        max_length: int = 512,
        batch_size: int = 4,
        template: str = "auto",
        system_prompt: str | None = None,
        val_fraction: float = 0.2,
        train_size: int | None = None,
        val_size: int | None = None,
        generate_size: int = 0,
        split_seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        if isinstance(train, str) and train in INSTRUCTION_TASKS:
            raise ValueError(
                f"{train!r} is an instruction task without preference pairs; make pairs from it with "
                "scripts/make_dpo_pairs.py and pass the .jsonl it writes"
            )
        super().__init__(
            tokenizer,
            train,
            val,
            max_length,
            batch_size,
            template,
            system_prompt,
            packing=False,
            val_fraction=val_fraction,
            train_size=train_size,
            val_size=val_size,
            generate_size=generate_size,
            split_seed=split_seed,
            num_workers=num_workers,
            shuffle=shuffle,
        )

    @property
    def has_reference_logps(self) -> bool:
        """Whether the records carry precomputed reference log-probabilities (known after ``setup``)."""
        return bool(self._train) and self._train[0].ref_logps is not None

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_name) if isinstance(self.tokenizer_name, str) else self.tokenizer_name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.train_records, self.val_records = self._records()
        encode = partial(encode_pairs, tokenizer, max_length=self.max_length, template=self.template, system_prompt=self.system_prompt)
        self._train = encode(self.train_records)
        val = encode(self.val_records)
        if self.val_records and (val[0].ref_logps is None) != (self._train[0].ref_logps is None):
            raise ValueError(
                "the training records carry reference log-probs and the validation records do not (or the reverse); give them for both or neither"
            )
        gen = [
            (prompt_ids(tokenizer, as_sft_record(r, r["chosen"]), self.template, self.system_prompt, i)[-self.max_length :], r["chosen"])
            for i, r in enumerate(self.val_records[: self.generate_size])
        ]
        self._val = [(p, *gen[i]) if i < len(gen) else (p, None, None) for i, p in enumerate(val)]
        self.tokenizer = tokenizer

    def _loader(self, items: list[Any], shuffle: bool, packing: bool = False) -> DataLoader:
        collate = partial(_collate, pad_id=self.tokenizer.pad_token_id)
        return DataLoader(_Examples(items), batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Pairs in (shuffled) batches; the DPO loss is a mean over pairs, so no token windows are attached."""
        return self._loader([(e, None, None) for e in self._train], shuffle=self.shuffle)
