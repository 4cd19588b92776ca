"""Replay as a callback: mix examples of earlier tasks into every training batch of an unchanged module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset

from ..data.replay import ReplayLoader, replay_count
from ..losses.distillation import output_logits, soft_target_loss
from ..utils.patching import Patch, patch_method

__all__ = ["Replay"]


def _as_dataset(source: Any) -> Dataset:
    """A replay data set: a map-style ``Dataset``, or a data module whose training split is replayed."""
    if isinstance(source, pl.LightningDataModule):
        source.setup("fit")
        return source.train_dataloader().dataset
    if isinstance(source, Dataset) or (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
        return source
    raise TypeError(f"Replay: a replay data set must be a map-style Dataset or a LightningDataModule, got {type(source).__name__}")


class Replay(pl.Callback):
    """Train on ``new batch + old examples``: a share of every batch is drawn from earlier data sets.

    Against forgetting (experience replay; DreamBooth's prior preservation is the same idea): each
    training batch of ``n`` new examples gets ``count`` old ones, or ``round(n · ratio / (1 − ratio))``
    so that they make ``ratio`` of it. They are collated together by your DataLoader's own
    ``collate_fn`` (so padding and fields stay consistent) and come last in the batch; your
    ``training_step`` sees one ordinary batch and its loss covers both. The old examples must have
    the new ones' structure and their labels must be in the model's output space: for tasks with
    different label sets, give the model the union of the labels (a head of ``C_old + C_new`` rows,
    the new labels offset past the old) and read each task's predictions from its own rows.

    Old examples come from the callback's own sampler (:class:`~lightning_peft.data.replay.ReplaySampler`):
    a seeded permutation of all old examples per pass, so every old example is drawn at the same rate,
    however the passes fall across epochs; under DDP each rank draws a disjoint shard of each pass,
    and the new data is sharded as Lightning would. The train loader is wrapped when Lightning
    requests it (the fit loop's data source), so the module and data module stay unchanged; the
    loader's length is the new loader's. The stream's position at the last trained batch is saved in
    the callback's checkpoint state, so a run resumed from an epoch-end checkpoint draws the same old
    examples as an uninterrupted one.

    ``soft_weight > 0`` adds ``soft_weight · T² · KL(softmax(z₀/T) ‖ softmax(z/T))`` on the old examples'
    logits ``(m, C)``, where ``z₀`` are the logits the model gave them at the start of training (before any
    step; recorded once, in eval mode, and saved with the callback's state) — knowledge distillation
    toward the old model on replayed data (:func:`~lightning_peft.soft_target_loss`). It needs batches
    that are dicts (the forward takes every key but ``label_key``) or ``(inputs, labels)`` pairs, a
    ``training_step`` that calls the module's forward once on the whole batch, and logits ``(B, C)``.

    Args:
        datasets: one or more earlier data sets (map-style), or data modules whose training split is replayed.
        ratio: share of old examples in each batch, in ``[0, 1)``.
        count: old examples per batch (instead of ``ratio``).
        soft_weight: weight of the soft-target loss on old examples (0: hard labels only).
        temperature: softmax temperature ``T > 0`` of the soft targets.
        seed: seed of the replay permutations.
        label_key: the labels' key in dict batches (not passed to forward when recording soft targets).

    Example:
        >>> trainer = pl.Trainer(callbacks=[Replay(old_train_set, ratio=0.25)])  # doctest: +SKIP
    """

    def __init__(
        self,
        datasets: Any,
        ratio: float | None = None,
        count: int | None = None,
        soft_weight: float = 0.0,
        temperature: float = 2.0,
        seed: int = 0,
        label_key: str = "labels",
    ) -> None:
        if (ratio is None) == (count is None):
            raise ValueError(f"Replay: give exactly one of ratio (share of each batch, in [0, 1)) or count (old examples per batch); got ratio={ratio}, count={count}")
        if ratio is not None:
            replay_count(1, ratio)  # validates the range
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ValueError(f"Replay: count must be an integer >= 0 (old examples per batch), got {count!r}")
        if soft_weight < 0:
            raise ValueError(f"Replay: soft_weight must be >= 0, got {soft_weight}")
        if temperature <= 0:
            raise ValueError(f"Replay: temperature must be > 0, got {temperature}")
        many = isinstance(datasets, Sequence) and not isinstance(datasets, (Dataset, str))  # a list (Hydra's ListConfig too)
        sources = list(datasets) if many else [datasets]
        if not sources:
            raise ValueError("Replay: no replay data set given; pass one or more earlier data sets.")
        self.sources = sources
        self.ratio = ratio
        self.count = count
        self.soft_weight = soft_weight
        self.temperature = temperature
        self.seed = seed
        self.label_key = label_key
        self.datasets: list[Dataset] = []
        self.loader: ReplayLoader | None = None
        self.targets: Tensor | None = None  # (N_old, C) logits before fine-tuning, when soft_weight > 0
        self.batch_replay: list[int] = []  # replay-set indices of the old examples in the current batch
        self._saved_position: dict[str, int] | None = None
        self._patches: list[Patch] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ratio=self.ratio, count=self.count, seed=self.seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.datasets = [_as_dataset(s) for s in self.sources]
        sizes = [len(d) for d in self.datasets]
        if sum(sizes) == 0:
            raise ValueError(f"Replay: the replay data sets are empty (sizes {sizes}); give at least one old example to replay.")
        if self.soft_weight > 0 and not pl_module.automatic_optimization:
            raise ValueError("Replay(soft_weight>0) works with automatic optimization; with manual optimization add soft_target_loss to your own step.")
        self._uninstall()
        source = trainer.fit_loop._data_source  # where the fit loop requests train_dataloader()

        def wrap(original: Any) -> Any:
            def dataloader() -> Any:
                return self._wrap_loader(trainer, original())

            return dataloader

        self._patches.append(patch_method(source, "dataloader", wrap))
        if self.soft_weight > 0:
            self._patches.append(patch_method(pl_module, "training_step", self._wrap_step(pl_module)))
        rank_zero_info(
            f"Replay: {sum(sizes)} old examples from {len(sizes)} data set(s), "
            + (f"{self.count} per batch" if self.count is not None else f"{self.ratio:.0%} of each batch")
            + (f", soft targets (weight {self.soft_weight}, T={self.temperature})" if self.soft_weight > 0 else "")
        )

    def _wrap_loader(self, trainer: pl.Trainer, loader: Any) -> ReplayLoader:
        if isinstance(loader, (list, tuple, Mapping)):
            raise TypeError("Replay: the training step takes one DataLoader; multiple train dataloaders are not supported.")
        kwargs = trainer.distributed_sampler_kwargs or {}
        self.loader = ReplayLoader(loader, self.datasets, count=self.count, ratio=self.ratio, seed=self.seed,
                                   num_replicas=kwargs.get("num_replicas", 1), rank=kwargs.get("rank", 0),
                                   shard_new=getattr(trainer._accelerator_connector, "use_distributed_sampler", True))
        if self._saved_position is not None:
            self.loader.batch_sampler.replay.load_state_dict(self._saved_position)
            self.loader.batch_sampler.trained_state = self.loader.batch_sampler.replay.state_dict()
        return self.loader

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the train loader is built and before the first step: the model is still the old one.
        if self.soft_weight > 0 and self.targets is None:
            self.targets = self._record_targets(pl_module)

    @torch.no_grad()
    def _record_targets(self, pl_module: pl.LightningModule) -> Tensor:
        """Logits ``(N_old, C)`` of the model as it is now, over every replay example, in eval mode."""
        assert self.loader is not None, "the fit loop requests the train loader before on_train_start"
        collate = self.loader.loader.collate_fn
        replay = self.loader.replay_set
        was_training = pl_module.training
        pl_module.eval()
        out = []
        try:
            for start in range(0, len(replay), 64):
                batch = collate([replay[i] for i in range(start, min(start + 64, len(replay)))])
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                out.append(output_logits(self._forward(pl_module, batch), "Replay: the module's forward").float().cpu())
        finally:
            pl_module.train(was_training)
        return torch.cat(out)

    def _forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return pl_module(**{k: v for k, v in batch.items() if k != self.label_key})
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return pl_module(batch[0])
        raise TypeError(
            f"Replay(soft_weight>0): batches are {type(batch).__name__}; soft targets need dict batches "
            f"(forward gets every key but {self.label_key!r}) or (inputs, labels) pairs."
        )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.loader is not None:
            self.batch_replay = self.loader.batch_sampler.trained()

    def _wrap_step(self, pl_module: pl.LightningModule) -> Any:
        def wrap(original: Any) -> Any:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                return self._step(pl_module, original, args, kwargs)

            return training_step

        return wrap

    def _step(self, pl_module: pl.LightningModule, original: Any, args: tuple, kwargs: dict) -> Any:
        outputs: list[Any] = []
        handle = pl_module.register_forward_hook(lambda m, a, o: outputs.append(o))
        try:
            out = original(*args, **kwargs)
        finally:
            handle.remove()
        m = len(self.batch_replay)
        if out is None or m == 0:
            return out
        task = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(task, Tensor):
            raise TypeError(f"Replay: training_step must return the loss (a tensor or a dict with 'loss'), got {type(out).__name__}.")
        if len(outputs) != 1:
            raise RuntimeError(f"Replay(soft_weight>0): the module's forward ran {len(outputs)} times in training_step; it must run once on the whole batch.")
        logits = output_logits(outputs[0], "Replay: the module's forward")
        targets = self.targets[self.batch_replay].to(logits.device)
        soft = soft_target_loss(logits[-m:], targets, self.temperature)
        loss = task + self.soft_weight * soft
        pl_module.log("replay/soft", soft.detach(), batch_size=logits.shape[0])
        return {**out, "loss": loss} if isinstance(out, Mapping) else loss

    def state_dict(self) -> dict[str, Any]:
        position = self.loader.batch_sampler.trained_state if self.loader is not None else self._saved_position
        return {"position": dict(position) if position else None, "targets": self.targets}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_position = state_dict.get("position")
        self.targets = state_dict.get("targets")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.loader is not None:
            self._saved_position = dict(self.loader.batch_sampler.trained_state)
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches = []
