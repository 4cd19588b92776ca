"""GRPO: group-relative policy optimisation of a causal LM (usually its adapter) against a reward function."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.instructions import IGNORE_INDEX
from ..losses.logprobs import token_logprobs
from ..models.causal_lm import CausalLM
from ..optim.build import OptimizerFactory, SchedulerFactory
from ..peft.functional import active_adapters, disable_adapters
from .grpo_loss import SCALE_REWARDS, group_advantages, grpo_loss
from .rewards import RewardFunction, resolve_reward, reward_name, score_completions

__all__ = ["GRPO", "Rollout"]


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled completions, scored: ``N = prompts × num_generations`` rows, a prompt's group consecutive.

    ``input_ids``/``attention_mask`` ``(N, P + C)``: left-padded prompt then completion; ``completion_mask``
    ``(N, C)``: true on completion tokens up to and including the first EOS; ``rewards``/``advantages`` ``(N,)``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int
    rewards: torch.Tensor
    advantages: torch.Tensor


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each put back to its own previous mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """The global generators seeded with ``seed`` inside the block and restored after (``None``: left alone)."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class GRPO(CausalLM):
    """Group-relative policy optimisation (DeepSeekMath's GRPO, as TRL's ``GRPOTrainer``) of a causal LM.

    Each training step samples ``num_generations`` completions per prompt of the batch (``temperature``, no
    top-k/top-p, KV cache, left-padded prompts, the model in eval mode), scores them with ``reward``, turns the
    rewards into advantages within each prompt's group (:func:`~lightning_peft.alignment.grpo_loss.group_advantages`)
    and minimises the clipped token-level surrogate plus ``beta`` × k3 KL to the reference
    (:func:`~lightning_peft.alignment.grpo_loss.grpo_loss`), aggregated as TRL's default ``"dapo"``: one mean over
    every completion token of the batch (of all ranks under DDP; under gradient accumulation each micro-batch's
    mean weighs equally, as in :class:`~lightning_peft.CausalLM`). Log-probabilities are those of
    ``logits / temperature``, the distribution sampled from. With one optimisation pass per sampled batch the
    sampling-time log-probabilities equal the current ones, so they are taken from the same forward (TRL's
    shortcut): the ratio is 1, the clipped form is kept and its clip fraction logged. The reference is the
    same network with its adapters disabled (no second model); ``beta=0`` skips that forward.

    Training batches need ``prompt_ids``, ``prompt_mask`` and ``references``:
    ``InstructionDataModule(..., train_prompts=True)``. Logged per step: ``train/reward``, ``train/reward_std``
    (mean within-group std), ``train/zero_std_fraction`` (groups with equal rewards: no learning signal),
    ``train/completion_length`` (tokens), ``train/kl``, ``train/clip_fraction``,
    ``train/loss``. Validation adds ``val/reward`` (of the greedy answers) to :class:`~lightning_peft.CausalLM`'s
    ``val/loss``, ``val/rougeL`` and ``val/exact_match``.

    Args:
        name_or_path: hub id or local folder of the model, or a built ``nn.Module``.
        reward: ``(prompts, completions, references) -> list[float]``, a dotted path to one, or a
            ``{_target_: ...}`` mapping (see :func:`~lightning_peft.alignment.rewards.resolve_reward`).
        num_generations: completions sampled per prompt (G >= 2: the group's mean reward is the baseline).
        temperature: sampling temperature (> 0).
        max_new_tokens: tokens generated per completion, in training and validation.
        beta: weight of the KL to the reference (needs an adapter; 0, TRL's default, skips the reference pass).
        epsilon: clipping range of the ratio.
        scale_rewards: ``group`` (divide by the group's std), ``batch`` (by the batch's) or ``none``.
        sft_adapter: a saved adapter (folder, PEFT folder or PEFT checkpoint) merged into the weights first, so
            GRPO starts from the SFT model and the reference (adapters disabled) is that SFT model.
        sampling_seed: completions are sampled under ``seed(sampling_seed, batch number, rank)``, so a resumed run
            samples what the uninterrupted one did; ``None`` samples from the global generator.
        tokenizer, optimizer, scheduler, dtype: as :class:`~lightning_peft.CausalLM`.
    """

    default_lr = 1e-6  # TRL's GRPOConfig default (full fine-tuning); LoRA wants far more (peft.lr)

    def __init__(
        self,
        name_or_path: str | nn.Module,
        reward: RewardFunction | str | Mapping[str, Any],
        tokenizer: str | Any | None = None,
        num_generations: int = 4,
        temperature: float = 1.0,
        max_new_tokens: int = 16,
        beta: float = 0.0,
        epsilon: float = 0.2,
        scale_rewards: str = "group",
        sft_adapter: str | Path | None = None,
        sampling_seed: int | None = 0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        dtype: str | None = None,
    ) -> None:
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
            raise ValueError(
                f"num_generations must be an integer >= 2, got {num_generations!r}: GRPO's baseline is the mean reward of "
                "a prompt's group of completions, so with one completion every advantage is 0 and nothing trains"
            )
        for name, value, ok, rule in (
            ("temperature", temperature, temperature > 0, "> 0"),
            ("beta", beta, beta >= 0, ">= 0"),
            ("epsilon", epsilon, 0 < epsilon < 1, "in (0, 1)"),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {value!r}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
        super().__init__(
            name_or_path, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, max_new_tokens=max_new_tokens, dtype=dtype,
            sft_adapter=sft_adapter,
        )
        self.reward_fn = resolve_reward(reward)
        self.num_generations, self.temperature, self.beta, self.epsilon = num_generations, float(temperature), float(beta), float(epsilon)
        self.scale_rewards, self.sampling_seed = scale_rewards, sampling_seed
        # plain values only: checkpoints are read with weights_only=True (the reward is recorded by name)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "name_or_path", "tokenizer", "reward"])
        self.hparams["reward"] = reward_name(self.reward_fn)
        if sft_adapter is not None:
            self.hparams["sft_adapter"] = str(sft_adapter)  # merged by CausalLM; a Path would not load with weights_only=True

    # --- sampling and scoring ------------------------------------------------------------------

    def _sampling_seed(self) -> int | None:
        if self.sampling_seed is None:
            return None
        trainer = self._trainer
        batch = trainer.fit_loop.epoch_loop.total_batch_idx if trainer is not None else self.global_step
        rank = trainer.global_rank if trainer is not None else 0
        return (self.sampling_seed * 1_000_003 + batch * 1_009 + rank) % (2**63)

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_generations`` completions per left-padded prompt ``(B, P)``: ids and masks ``(B·G, C)``.

        The mask is true up to and including each completion's first EOS (what follows is padding).
        """
        from transformers import GenerationConfig

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        ids = prompt_ids.repeat_interleave(self.num_generations, dim=0)
        mask = prompt_mask.repeat_interleave(self.num_generations, dim=0)
        with _eval_mode(self.model), _seeded(self._sampling_seed()):
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        completion = out[:, ids.shape[1] :]
        is_eos = completion == tok.eos_token_id
        first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), completion.shape[1])
        keep = torch.arange(completion.shape[1], device=completion.device) <= first.unsqueeze(1)
        return completion, keep

    def rollout(self, batch: Mapping[str, Any]) -> Rollout:
        """Sample, decode and score completions for a training batch and compute their advantages."""
        missing = [k for k in ("prompt_ids", "prompt_mask", "references") if k not in batch]
        if missing:
            raise ValueError(
                f"GRPO's training batches need {missing}: the prompts to sample from and the reference answers. "
                "Use InstructionDataModule(..., train_prompts=True) (Hydra: data.train_prompts=true)."
            )
        prompt_ids, prompt_mask, g = batch["prompt_ids"], batch["prompt_mask"], self.num_generations
        completion, keep = self.sample(prompt_ids, prompt_mask)
        prompts = self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
        texts = [self.tokenizer.decode(c[k], skip_special_tokens=True).strip() for c, k in zip(completion, keep)]
        rewards = score_completions(
            self.reward_fn, [p for p in prompts for _ in range(g)], texts, [r for r in batch["references"] for _ in range(g)]
        )
        rewards = rewards.to(prompt_ids.device)
        ids = torch.cat([prompt_ids.repeat_interleave(g, dim=0), completion], dim=1)
        mask = torch.cat([prompt_mask.repeat_interleave(g, dim=0), keep.to(prompt_mask.dtype)], dim=1)
        return Rollout(ids, mask, keep, prompt_ids.shape[1], rewards, group_advantages(rewards, g, self.scale_rewards))

    # --- the loss --------------------------------------------------------------------------------

    def completion_logps(self, rollout: Rollout) -> torch.Tensor:
        """Log-probabilities ``(N, C)`` of the completion tokens under ``logits / temperature`` (0 where masked).

        Position ids count real tokens only, as in generation, so left padding does not shift them.
        """
        p, c = rollout.prompt_length, rollout.completion_mask.shape[1]
        positions = (rollout.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = self.model(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=c + 1,
        ).logits
        labels = rollout.input_ids[:, p - 1 :].clone()
        labels[:, 0] = IGNORE_INDEX
        labels[:, 1:][~rollout.completion_mask] = IGNORE_INDEX
        logps, _ = token_logprobs(logits.float() / self.temperature, labels)
        return logps

    def policy_loss(self, rollout: Rollout) -> torch.Tensor:
        """GRPO's loss on a rollout (the gradient pass, plus the reference pass when ``beta > 0``); logs the step's statistics."""
        logps = self.completion_logps(rollout)
        ref_logps = None
        if self.beta != 0.0:
            if not active_adapters(self.model):
                raise ValueError(
                    "beta > 0 needs an adapter (PEFT callback or PEFTMixin): the KL reference is the model with its "
                    "adapters disabled, and this model has none, so the KL would be 0. Use beta=0 or train an adapter."
                )
            with torch.no_grad(), disable_adapters(self.model):
                ref_logps = self.completion_logps(rollout)
        mask = rollout.completion_mask
        tokens = mask.sum().float()
        normalizer = tokens
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # DDP averages gradients over ranks: dividing by (all ranks' tokens / world) makes that the global token mean
            normalizer = self.trainer.strategy.reduce(tokens.detach(), reduce_op="sum") / world
        loss, stats = grpo_loss(
            logps, rollout.advantages, mask, ref_logps=ref_logps, beta=self.beta, epsilon=self.epsilon, normalizer=normalizer.clamp_min(1.0)
        )
        groups = rollout.rewards.view(-1, self.num_generations)
        n = groups.shape[0]
        logged = {
            "reward": rollout.rewards.mean(),
            "reward_std": groups.std(dim=1).mean(),
            "zero_std_fraction": (groups.std(dim=1) == 0).float().mean(),
            "completion_length": mask.sum(1).float().mean(),
            "kl": stats.kl,
            "clip_fraction": stats.clip_fraction,
            "loss": loss.detach() * normalizer / tokens.clamp_min(1.0),
        }
        for key, value in logged.items():
            self.log(f"train/{key}", value, prog_bar=key in ("reward", "loss"), batch_size=n, sync_dist=world > 1)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.policy_loss(self.rollout(batch))

    # --- validation: CausalLM's scores plus the mean reward of the greedy answers ----------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=int(tokens))
        if "prompt_ids" in batch and self.tokenizer is not None:
            answers = self.generate(batch["prompt_ids"], batch["prompt_mask"])
            prompts = self.tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
            for prompt, reference, answer in zip(prompts, batch["references"], answers):
                self._record(prompt, reference, answer)
            self._scores["reward"].extend(score_completions(self.reward_fn, prompts, answers, list(batch["references"])).tolist())

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._scores["reward"] = []
