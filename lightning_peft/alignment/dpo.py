"""DPO: preference tuning of a causal LM (a :class:`~lightning_peft.CausalLM`) on chosen/rejected pairs.

The reference policy costs no second model when a PEFT method is active: it is the same network run with its
adapters disabled (:func:`~lightning_peft.disable_adapters`), in eval mode and without gradients.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..losses.logprobs import token_logprobs
from ..models.causal_lm import CausalLM
from ..optim.build import OptimizerFactory, SchedulerFactory
from ..peft.functional import disable_adapters, list_adapters
from .dpo_loss import DPOLoss, check_dpo_settings, dpo_loss, kl_estimate
from .preference_data import REF_KEYS

__all__ = ["DPO", "REFERENCES"]

log = logging.getLogger(__name__)

REFERENCES = ("auto", "adapters", "copy", "precomputed")


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; every submodule's own mode is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class DPO(CausalLM):
    """Direct preference optimisation of a causal LM on batches of :class:`~lightning_peft.PreferenceDataModule`.

    Each step runs chosen and rejected completions through the model in one forward (``2B`` rows, chosen
    first), sums each completion's token log-probabilities (:func:`~lightning_peft.losses.logprobs.token_logprobs`)
    and applies :func:`~lightning_peft.alignment.dpo_loss.dpo_loss` against the reference policy's.

    The reference (``reference=``):

    - ``adapters``: the same network with its adapters disabled, no gradients, eval mode -- no second model.
      The reference is then the model *without the trained adapter*: to start DPO from an SFT adapter, pass
      ``sft_adapter=`` (merged into the weights first, so both the starting policy and the reference are the
      SFT model, as in InstructGPT and SPIN), or use ``copy``, or precompute the reference log-probs.
    - ``copy``: a frozen deep copy of the model taken at ``setup`` (before a resumed checkpoint is loaded, so it
      is the starting policy, adapters included), kept out of the state dict and checkpoints; doubles the
      weights' memory.
    - ``precomputed``: ``ref_chosen_logps``/``ref_rejected_logps`` carried by the records (sums over each
      completion's tokens, EOS included, as :func:`token_logprobs` gives on the datamodule's rows).
    - ``auto`` (default), resolved at ``setup``: ``precomputed`` if the datamodule's records carry them, else
      ``adapters`` if the model has adapters (a PEFT callback injected them), else ``copy``.

    Logs under ``train/`` (each step) and ``val/`` (epoch means over all ranks): ``loss``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margin``, ``rewards/accuracy`` (share of pairs whose implicit reward
    ``β·log π/π_ref`` prefers the chosen completion), ``logps/chosen``, ``logps/rejected`` (summed),
    ``logps/accuracy`` (share of pairs whose chosen completion has the higher mean per-token log-prob under the
    policy alone; unlike the implicit-reward accuracy it is informative before training), ``kl``
    (mean per-token k3 estimate of KL(π ‖ π_ref) on the chosen completions' tokens, see
    :func:`~lightning_peft.alignment.dpo_loss.kl_estimate`; with precomputed references, the k3 of each
    chosen completion's per-token mean log-ratio; rejected tokens are left out because DPO pushes them far
    below the reference, where k3 grows exponentially without describing what the policy samples) and
    ``logratio/chosen``, ``logratio/rejected`` (mean per-token ``log π − log π_ref`` of each side, in nats). Validation batches with prompts also score greedy answers
    against the chosen ones (``val/rougeL``, ``val/exact_match``, ``samples.jsonl``) as :class:`CausalLM` does.

    Args:
        name_or_path, tokenizer, optimizer, scheduler, max_new_tokens, dtype, sft_adapter: as
            :class:`~lightning_peft.CausalLM`.
        beta: β, how far the policy may move from the reference (IPO: the regulariser τ). TRL's default 0.1.
        loss_type: ``sigmoid`` (DPO) or ``ipo`` (length-averaged log-ratios, as TRL).
        label_smoothing: ε in [0, 0.5), the assumed probability that a preference is flipped (conservative DPO).
        reference: ``auto``, ``adapters``, ``copy`` or ``precomputed`` (see above).
    """

    default_lr = 1e-6  # TRL DPOConfig's default: preference tuning of the full model wants a tiny rate

    def __init__(
        self,
        name_or_path: str | nn.Module,
        tokenizer: str | Any | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        max_new_tokens: int = 32,
        dtype: str | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference: str = "auto",
        sft_adapter: str | Path | None = None,
    ) -> None:
        check_dpo_settings(beta, loss_type, label_smoothing)
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        super().__init__(name_or_path, tokenizer, optimizer, scheduler, max_new_tokens, dtype, sft_adapter)
        self.beta, self.loss_type, self.label_smoothing, self.reference = float(beta), loss_type, float(label_smoothing), reference
        self.reference_mode: str | None = None  # what ``reference`` resolved to at setup
        self._frozen_reference: tuple[nn.Module, ...] = ()  # a tuple: not a submodule, so never saved nor trained

    # --- the reference --------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.reference_mode = self._resolve_reference()
        if self.reference_mode == "copy" and not self._frozen_reference:
            reference = copy.deepcopy(self.model).eval()
            reference.requires_grad_(False)
            self._frozen_reference = (reference,)
        log.info("DPO reference: %s (reference=%r)", self.reference_mode, self.reference)

    def _resolve_reference(self) -> str:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        precomputed = bool(getattr(datamodule, "has_reference_logps", False))
        has_adapters = bool(list_adapters(self.model))
        if self.reference == "auto":
            return "precomputed" if precomputed else "adapters" if has_adapters else "copy"
        if self.reference == "adapters" and not has_adapters:
            raise ValueError(
                "reference='adapters' needs adapters on the model (add a PEFT callback, e.g. peft=lora); "
                "for full fine-tuning use reference='copy' or 'precomputed'"
            )
        if self.reference == "precomputed" and datamodule is not None and hasattr(datamodule, "has_reference_logps") and not precomputed:
            raise ValueError(f"reference='precomputed' but the records carry no {list(REF_KEYS)}; use reference='adapters' or 'copy'")
        return self.reference

    @torch.no_grad()
    def reference_token_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token log-probs ``(2B, T-1)`` of the batch's labels under the reference (adapters off, or the copy)."""
        mode = self.reference_mode or self._resolve_reference()
        if mode == "copy":
            if not self._frozen_reference:
                raise RuntimeError("reference='copy' but no copy was taken: call setup() first (Trainer.fit does)")
            reference = self._frozen_reference[0]
            if next(reference.parameters()).device != self.device:
                reference.to(self.device)
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
        elif mode == "adapters":
            with disable_adapters(self.model), evaluating(self.model):
                logits = self(batch["input_ids"], batch.get("attention_mask"))
        else:
            raise ValueError(f"the reference is {mode!r}: its log-probs come with the batch, not from a model")
        return token_logprobs(logits, batch["labels"])[0]

    # --- the loss -------------------------------------------------------------------------------

    def pair_loss(self, batch: dict[str, Any]) -> tuple[DPOLoss, dict[str, torch.Tensor]]:
        """DPO losses of the batch's ``B`` pairs (one forward of ``2B`` rows) and the statistics to log (means)."""
        logps, mask = token_logprobs(self(batch["input_ids"], batch.get("attention_mask")), batch["labels"])
        tokens = mask.sum(-1)
        if int(tokens.min()) == 0:
            raise ValueError("a completion in this batch has no unmasked token: check max_length and the records")
        sequence = logps.sum(-1)
        if self.reference_mode == "precomputed" or (self.reference_mode is None and REF_KEYS[0] in batch):
            if REF_KEYS[0] not in batch:
                raise ValueError(f"the reference is precomputed but this batch carries no {list(REF_KEYS)}")
            ref_sequence = torch.cat([batch[REF_KEYS[0]], batch[REF_KEYS[1]]]).to(sequence)
            # only sums are known: the k3 of each completion's per-token mean log-ratio
            logps, ref_tokens, mask = (sequence / tokens)[:, None], (ref_sequence / tokens)[:, None], torch.ones_like(tokens, dtype=torch.bool)[:, None]
        else:
            ref_tokens = self.reference_token_logps(batch)
            ref_sequence = ref_tokens.sum(-1)
        # drift on the chosen rows only: rejected tokens are pushed far below the reference, where k3 = e^q - q - 1
        # grows exponentially (thousands) although the policy would never sample them
        pairs = mask.shape[0] // 2
        kl = kl_estimate(logps[:pairs], ref_tokens[:pairs], mask[:pairs])
        logratio = (sequence - ref_sequence).detach() / tokens
        chosen, rejected = sequence.chunk(2)
        ref_chosen, ref_rejected = ref_sequence.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        out = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing, chosen_tokens, rejected_tokens
        )
        stats = {
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margin": out.margins.mean(),
            "rewards/accuracy": out.accuracies.mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
            # the policy alone prefers chosen, per token (sums favour the shorter row): meaningful before training too
            "logps/accuracy": (chosen / chosen_tokens > rejected / rejected_tokens).float().mean(),
            "kl": kl,
            "logratio/chosen": logratio[:pairs].mean(),
            "logratio/rejected": logratio[pairs:].mean(),
        }
        return out, stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out, stats = self.pair_loss(batch)
        pairs = out.losses.shape[0]
        self.log("train/loss", out.losses.detach().mean(), prog_bar=True, batch_size=pairs)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=pairs)
        world = self.trainer.world_size
        if world == 1:
            return out.losses.mean()
        # DDP averages gradients over ranks: sum · world / (pairs of all ranks) is the mean over the global batch.
        everywhere = self.trainer.strategy.reduce(torch.tensor(float(pairs), device=out.losses.device), reduce_op="sum")
        return out.losses.sum() * world / everywhere

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, stats = self.pair_loss(batch)
        pairs = out.losses.shape[0]
        self.log("val/loss", out.losses.mean(), prog_bar=True, batch_size=pairs, sync_dist=True)
        self.log("val/rewards/accuracy", stats.pop("rewards/accuracy"), prog_bar=True, batch_size=pairs, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=pairs, sync_dist=True)
        self._score_generations(batch)
