"""A LightningModule for supervised fine-tuning of a decoder LLM on instruction data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..data.instructions import IGNORE_INDEX
from ..optim.build import OptimizerFactory, SchedulerFactory, configure_optimizers
from ..peft.adapter_files import load_adapter
from ..peft.checkpoint import check_adapter_only_checkpoint
from ..peft.functional import merge_and_unload
from ..utils.atomic_files import atomic_write_text
from .pretrained import _load, load_tokenizer

__all__ = ["CausalLM", "completion_loss", "load_causal_lm"]


def load_causal_lm(name_or_path: str, dtype: str | torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with offline resolution and a clear error."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return _load("causal LM", AutoModelForCausalLM.from_pretrained, name_or_path, dtype=dtype, **kwargs)


def completion_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on completion tokens: logits ``(B, T, V)``, labels ``(B, T)`` with ``-100`` masked.

    Returns ``(loss, tokens)``: the mean (or ``sum``) over the ``tokens`` positions whose label is not
    ``-100``. A batch with no completion token is an error: it almost always means a masking bug.
    """
    targets = labels[:, 1:]
    tokens = (targets != IGNORE_INDEX).sum()
    if int(tokens) == 0:
        raise ValueError(
            "every label in this batch is masked (-100): no completion token to learn from. Check that the records "
            "have completions and that max_length leaves room for them."
        )
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return (total if reduction == "sum" else total / tokens), tokens


class CausalLM(pl.LightningModule):
    """A ``transformers`` causal LM (``self.model``) trained on completion tokens only.

    ``forward(input_ids, attention_mask=None, position_ids=None) -> logits (B, T, vocab)``. The training
    loss is the mean over completion tokens of the whole optimizer step: under DDP over all ranks' batches
    (not a mean of per-rank means), and with ``Trainer(accumulate_grad_batches=k)`` over the k micro-batches
    of each accumulation window (not a mean of per-micro-batch means, which would weigh a token of a
    micro-batch with few completion tokens more), as ``transformers``' Trainer does with
    ``num_items_in_batch``. The window's count comes with each batch as ``window_tokens``
    (:class:`~lightning_peft.InstructionDataModule` attaches it, see :meth:`token_divisor`); a loader
    without it gives a per-token mean of each micro-batch. With the
    :class:`~lightning_peft.Distillation` callback the teacher's and student's next-token distributions are
    compared on the completion tokens, normalised the same way. Logs ``train/loss`` (per-token mean of each batch), ``val/loss``, and on validation batches that carry
    prompts (see :class:`~lightning_peft.InstructionDataModule`) greedy answers scored by ``val/rougeL``
    and ``val/exact_match``; each validation writes ``samples.jsonl`` and ``samples.md`` (prompt,
    reference, generated) into the trainer's ``default_root_dir`` (the run directory). Only parameters with ``requires_grad`` reach the
    optimizer, so the PEFT and freezing callbacks decide what trains.

    Args:
        name_or_path: hub id or local folder of the model, or an already built ``nn.Module``.
        tokenizer: tokenizer name or path (default: ``name_or_path``), for decoding generated answers.
        optimizer: factory taking the parameters (Hydra ``_partial_``); default AdamW(lr=``default_lr``).
        scheduler: factory ``(optimizer, total_steps=...)``, stepped every optimizer step; optional.
        max_new_tokens: tokens generated per validation answer.
        dtype: weights' dtype when loading by name (``float32``, ``bfloat16``; default: the checkpoint's).
        sft_adapter: a saved adapter (:func:`~lightning_peft.save_adapter` folder, a training run's ``adapter``
            folder, a Hugging Face PEFT folder or checkpoint) merged into the weights first, so training starts from
            that fine-tuned model with a new adapter, and an adapter-disabled reference (DPO, GRPO) is that model.
    """

    default_lr = 2e-5

    def __init__(
        self,
        name_or_path: str | nn.Module,
        tokenizer: str | Any | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        max_new_tokens: int = 32,
        dtype: str | None = None,
        sft_adapter: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "name_or_path", "tokenizer"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_new_tokens = max_new_tokens
        self.model = load_causal_lm(name_or_path, dtype) if isinstance(name_or_path, (str, Path)) else name_or_path
        if tokenizer is None and isinstance(name_or_path, (str, Path)):
            tokenizer = str(name_or_path)
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self._samples: list[dict[str, str]] = []
        self._scores: dict[str, list[float]] = {"rougeL": [], "exact_match": []}
        self.model.train()
        if sft_adapter is not None:
            self.hparams["sft_adapter"] = str(sft_adapter)  # a Path would not load with weights_only=True
            self._merge_sft_adapter(str(sft_adapter))

    def _merge_sft_adapter(self, path: str) -> None:
        trainable = {name: p.requires_grad for name, p in self.model.named_parameters()}
        load_adapter(self.model, path, adapter_name="sft")  # names saved from a training run are re-rooted onto self.model
        merge_and_unload(self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(trainable.get(name, True))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_adapter_only_checkpoint(self, checkpoint)  # an adapter-only checkpoint without the PEFT callback: say so

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        return completion_loss(logits, batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        total, tokens = completion_loss(logits, batch["labels"], reduction="sum")
        self.log("train/loss", total.detach() / tokens, prog_bar=True, batch_size=int(tokens))
        return total / self.token_divisor(batch, tokens)

    def token_divisor(self, batch: dict[str, Any], tokens: torch.Tensor) -> torch.Tensor:
        """What this micro-batch's sum over its ``tokens`` completion tokens is divided by to give the loss to return.

        Lightning divides the returned loss by ``k = accumulate_grad_batches`` (also in an epoch's last,
        shorter window) and DDP averages gradients over ``world`` ranks. With ``batch["window_tokens"]``
        (the completion tokens of this micro-batch's accumulation window, from
        :class:`~lightning_peft.data.instruction_datamodule.WindowBatchSampler`) the divisor is
        ``Σ_ranks window_tokens / (k · world)``, so the accumulated, rank-averaged gradient is the gradient of
        the mean over every completion token of the window on all ranks. Without it (your own loader) it is
        ``Σ_ranks tokens / world``: a per-token mean of each micro-batch, which accumulation then averages.
        Under DDP this all-reduces one scalar; every rank must call it equally often.
        """
        trainer = self.trainer
        window = batch.get("window_tokens")
        if window is None:
            count, k = tokens.detach().float(), 1
        else:
            count, k = torch.as_tensor(window, device=tokens.device).float(), trainer.accumulate_grad_batches
            if int(count) < int(tokens):
                raise ValueError(
                    f"the batch's window_tokens={int(count)} is less than its own {int(tokens)} completion tokens: whatever "
                    "attached window_tokens counted different labels. Count labels[:, 1:] != -100 over the accumulation window, "
                    "or drop window_tokens to average per micro-batch."
                )
        if trainer.world_size > 1:
            count = trainer.strategy.reduce(count, reduce_op="sum")
        return count.clamp_min(1.0) / (k * trainer.world_size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=int(tokens))
        self._score_generations(batch)

    def _score_generations(self, batch: dict[str, Any]) -> None:
        """Greedy answers to the batch's prompts (when it carries them), scored against its references."""
        if "prompt_ids" in batch and self.tokenizer is not None:
            answers = self.generate(batch["prompt_ids"], batch["prompt_mask"])
            prompts = self.tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
            for prompt, reference, answer in zip(prompts, batch["references"], answers):
                self._record(prompt, reference, answer)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs: Any) -> list[str]:
        """Greedy answers (KV cache on) to left-padded prompts ``(B, T)``, decoded without special tokens."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        settings = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "pad_token_id": pad, "eos_token_id": self.tokenizer.eos_token_id}
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **{**settings, **kwargs})
        return [text.strip() for text in self.tokenizer.batch_decode(out[:, prompt_ids.shape[1] :], skip_special_tokens=True)]

    def _record(self, prompt: str, reference: str, answer: str) -> None:
        from torchmetrics.functional.text import rouge_score

        rouge = float(rouge_score(answer, reference, rouge_keys="rougeL")["rougeL_fmeasure"])
        exact = float(answer.strip().casefold() == reference.strip().casefold())
        self._scores["rougeL"].append(rouge)
        self._scores["exact_match"].append(exact)
        self._samples.append({"prompt": prompt, "reference": reference, "generated": answer, "rougeL": round(rouge, 4), "exact_match": exact})

    def on_validation_epoch_start(self) -> None:
        self._samples = []
        self._scores = {"rougeL": [], "exact_match": []}

    def on_validation_epoch_end(self) -> None:
        if not self._samples:
            return
        for key, values in self._scores.items():
            self.log(f"val/{key}", sum(values) / len(values), prog_bar=True, sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write_samples()

    def _write_samples(self) -> None:
        root = Path(self.trainer.default_root_dir)  # the run directory (beside metrics.json)
        lines = [json.dumps({"step": self.global_step, **s}, ensure_ascii=False) for s in self._samples]
        atomic_write_text(root / "samples.jsonl", "\n".join(lines) + "\n")

        def cell(text: str) -> str:
            text = " ".join(text.split()).replace("|", "\\|")
            return text if len(text) <= 160 else "…" + text[-159:]

        table = ["| prompt (end) | reference | generated | ROUGE-L |", "|---|---|---|---:|"]
        table += [f"| {cell(s['prompt'])} | {cell(s['reference'])} | {cell(s['generated'])} | {s['rougeL']:.3f} |" for s in self._samples]
        atomic_write_text(root / "samples.md", f"# Validation samples at step {self.global_step}\n\n" + "\n".join(table) + "\n")

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory, self.default_lr)
