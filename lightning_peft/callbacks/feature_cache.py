"""Linear probing at the cost of one backbone pass: cache the features a frozen backbone feeds the head."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ..features.feature_point import FeaturePoint, find_feature_point
from ..features.store import FeatureStore, module_fingerprint, sample_keys
from ..features.verify import features_agree
from ..groups.freezing import set_eval, set_requires_grad
from ..groups.matching import format_names
from ..utils.atomic_files import ensure_writable_dir
from ..utils.patching import Patch, patch_method
from . import coordination

__all__ = ["FeatureCache", "FeatureCacheStats"]

@dataclass
class FeatureCacheStats:
    """What happened during the last fit: forward calls served from the cache or computed, rows added/loaded."""

    cached_calls: int = 0
    computed_calls: int = 0
    computed_examples: int = 0
    loaded: int = 0
    verified: bool = False
    rebuilt: str | None = None  # why a cache file was discarded, if one was


class FeatureCache(pl.Callback):
    """Train a linear probe (or any head) on cached backbone features, with the results of the uncached probe.

    Works on an unchanged module of the shape "backbone → pooling → head" (see
    :mod:`lightning_peft.features.feature_point`): the module (or the submodule holding backbone and head,
    the *owner*) is called once per batch with the batch's inputs and returns ``head(features)``,
    where ``head`` is called once with one ``(batch, dim)`` tensor. ``TextClassifier`` and
    torchvision/timm classifiers qualify. The callback freezes everything that computes the
    features (``freeze=True``), keeps it in eval mode, and replaces the owner's ``forward`` for the
    fit: each call is keyed per example by a hash of its inputs (and of what callbacks declaring
    ``provides_key_inputs`` feed the model beside them, e.g. ``KnowledgeInjection``'s vectors); when every example of the batch is
    cached it returns ``head(cached features)`` without running the backbone, otherwise it runs the
    original forward and stores the head's input. The first epoch therefore costs what the uncached
    probe costs; later epochs (and later runs, with ``cache_dir``) skip the backbone, for training
    and validation alike.

    Equality with the uncached probe (same seed → same metrics up to float noise from different
    padding) holds because the data loader, its shuffling and every random draw stay the same:
    anything random (e.g. ``TextClassifier``'s dropout) must sit in the head, after the cached point,
    so it runs in both paths; the backbone must be deterministic, which eval mode ensures; inputs
    must not be augmented randomly (augmented examples never hit the cache, so it simply does not
    help). The first fully cached batch of every fit is checked against a fresh forward pass: a
    stale disk cache is discarded and rebuilt, features that change between passes are an error.

    Choose the pooling on the module (``TextClassifier(pooling="cls" | "mean" | "last")``; CNN/ViT
    classifiers feed their head their pooled output). To probe an intermediate layer or another pooling
    without a module, use :func:`lightning_peft.extract_features`.

    Args:
        cache_dir: folder for cache files (one per model fingerprint); ``None`` keeps features in memory only.
        head: pattern naming the head module (default: found, see :func:`~lightning_peft.find_feature_point`).
        backbone: patterns naming the backbone when it is not recognised automatically.
        freeze: freeze everything outside the head that computes its input (at ``setup``).
        tolerance: relative tolerance of the check against a fresh pass; default 1e-3 (5e-2 for fp16/bf16 features).
        model_id: a string identifying the model instead of hashing its weights (you then own invalidation).

    Example:
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[FeatureCache(cache_dir="feature_cache")])  # doctest: +SKIP
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        head: str | None = None,
        backbone: str | list[str] | None = None,
        freeze: bool = True,
        tolerance: float | None = None,
        model_id: str | None = None,
    ) -> None:
        if tolerance is not None and tolerance <= 0:
            raise ValueError(f"FeatureCache: tolerance must be > 0, got {tolerance}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.head = head
        self.backbone = backbone
        self.freeze = freeze
        self.tolerance = tolerance
        self.model_id = model_id
        self.point: FeaturePoint | None = None
        self.store = FeatureStore()
        self.path: Path | None = None
        self.stats = FeatureCacheStats()
        self._meta: dict[str, Any] = {}
        self._owner: torch.nn.Module | None = None
        self._forward_patch: Patch | None = None
        self._from_disk = False
        self._dirty = False
        self._calls = 0
        self._announced = False
        self._key_sources: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(head=self.head, backbone=self.backbone)

    # --- fit lifecycle ---------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.cache_dir is not None:
            ensure_writable_dir(self.cache_dir, "FeatureCache cache_dir")  # fail now, not after the first epoch
        coordination.prepare_model(trainer, pl_module)  # adapters injected first, whatever the callback order
        training = coordination.declaring(trainer, "trains_backbone")
        if training:
            raise ValueError(
                f"FeatureCache caches the output of a frozen backbone, but {type(training[0]).__name__} trains part of "
                "it, so its features change. Use FeatureCache with a linear probe (FreezeBackbone(train_top=0) or no "
                "freezing callback), or drop FeatureCache."
            )
        self.point = find_feature_point(pl_module, self.head, self.backbone)
        if self.freeze:
            set_requires_grad(self.point.feature_modules(pl_module), False)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        point = self.point
        owner, head = point.modules(pl_module)
        feature_params = {id(p) for m in point.feature_modules(pl_module) for p in m.parameters()}
        trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) in feature_params]
        if trainable:
            raise ValueError(
                f"FeatureCache: parameters that compute the head's input still train ({format_names(trainable, 8)}), so "
                "cached features would go stale. Freeze them (FeatureCache(freeze=True), FreezeBackbone()) or drop FeatureCache."
            )
        if not any(p.requires_grad for p in head.parameters()):
            raise ValueError(f"FeatureCache: the head {point.head!r} has no trainable parameters; there is nothing to train on the features.")
        fingerprint = self.model_id or module_fingerprint(
            owner, exclude=[head], extra={"hparams": dict(getattr(pl_module, "hparams", {}) or {})}
        )
        self._meta = {"model": fingerprint, "owner": point.owner, "head": point.head, "class": type(owner).__qualname__}
        self.stats = FeatureCacheStats()
        self.store, self._from_disk, self.path = FeatureStore(), False, None
        if self.cache_dir is not None and trainer.world_size == 1:
            name = hashlib.sha256(fingerprint.encode()).hexdigest()[:24] if self.model_id else fingerprint[:24]
            self.path = self.cache_dir / f"{type(owner).__name__}-{name}.pt"
            store, problem = FeatureStore.load(self.path, self._meta)
            if store is not None:
                self.store, self._from_disk = store, True
                self.stats.loaded = len(store)
                rank_zero_info(f"FeatureCache: {len(store)} cached feature rows loaded from {self.path}")
            elif problem != "missing":
                self.stats.rebuilt = problem
                rank_zero_warn(f"FeatureCache: {self.path} is {problem}; ignoring it and rebuilding the cache.")
        elif self.cache_dir is not None:
            rank_zero_warn(
                "FeatureCache: disk caching is off with several processes (each rank caches the examples it sees, in "
                "memory). HINT: run once on one device to build the cache file, or set cache_dir=None."
            )
        self._key_sources = coordination.declaring(trainer, "provides_key_inputs")  # e.g. KnowledgeInjection's vectors
        self._install(owner, head)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        set_eval(self.point.feature_modules(pl_module))  # Lightning calls model.train() every epoch
        self._calls = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._calls == 0:
            where = f"self.{self.point.owner}" if self.point.owner else "self"
            raise RuntimeError(
                f"FeatureCache: {type(self._owner).__name__} ({where}) was not called during training_step, so its "
                f"features cannot be served from the cache. FeatureCache needs training_step to call {where}(inputs), "
                f"which must return {self.point.head}(features); drop FeatureCache for modules that call the backbone "
                "and head separately."
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._announced and len(self.store):
            self._announced = True
            rank_zero_info(f"FeatureCache: {len(self.store)} examples cached; fully cached batches skip the backbone from now on.")
        self._save()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save()
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()

    # --- the cached forward ----------------------------------------------------------------------

    def _install(self, owner: torch.nn.Module, head: torch.nn.Module) -> None:
        self._uninstall()
        self._owner = owner
        self._forward_patch = patch_method(owner, "forward", lambda original: self._cached_forward(original, head))

    def _cached_forward(self, original: Any, head: torch.nn.Module) -> Any:
        """The owner's ``forward`` for the fit: the head on cached features when the whole batch is cached."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            self._calls += 1
            extra = {k: v for source in self._key_sources for k, v in source.key_inputs().items()}
            keys = sample_keys(args, kwargs, extra=extra)
            missing = self.store.missing(keys)
            if not missing and self.stats.verified:
                self.stats.cached_calls += 1
                weight = next(head.parameters())
                return head(self.store.lookup(keys, device=weight.device))
            features, out = self._run_original(original, head, args, kwargs)
            self.stats.computed_calls += 1
            if missing:
                self.stats.computed_examples += len(missing)
                self._dirty |= self.store.add(keys, features) > 0
            else:
                self._verify(keys, features)
            return out

        return forward

    def _uninstall(self) -> None:
        if self._forward_patch is not None:
            self._forward_patch.restore()
            self._forward_patch = None
        self._owner = None

    def _run_original(self, original: Any, head: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Any]:
        """Run the module's own forward; return (the head's input ``(B, D)``, the forward's output)."""
        calls: list[tuple[tuple, dict]] = []
        outputs: list[Any] = []
        pre = head.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
        post = head.register_forward_hook(lambda m, a, o: outputs.append(o))
        try:
            out = original(*args, **kwargs)
        finally:
            pre.remove()
            post.remove()
        name, where = self.point.head, type(self._owner).__name__
        if len(calls) != 1:
            raise RuntimeError(f"FeatureCache: {where}.forward called the head {name!r} {len(calls)} times; it must call it exactly once per forward.")
        (head_args, head_kwargs) = calls[0]
        if head_kwargs or len(head_args) != 1 or not isinstance(head_args[0], Tensor) or head_args[0].dim() != 2:
            shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in head_args]
            raise RuntimeError(
                f"FeatureCache: the head {name!r} must receive one (batch, dim) tensor; it got positional {shapes} and "
                f"keyword {sorted(head_kwargs)}. Pass head='<module>' naming the module that takes the pooled features."
            )
        if out is not outputs[0]:
            raise RuntimeError(
                f"FeatureCache: {where}.forward must return exactly what the head {name!r} returns (got {type(out).__name__}). "
                "Models that wrap their logits (e.g. transformers' *ForSequenceClassification outputs) are not supported; "
                "wrap the backbone and a head in your own module."
            )
        return head_args[0].detach(), out

    def _verify(self, keys: list[bytes], fresh: Tensor) -> None:
        """Compare a fresh pass with the cache (first fully cached batch of the fit)."""
        stored = self.store.lookup(keys, device=fresh.device)
        agree, error = features_agree(stored, fresh, self.tolerance)
        if agree:
            self.stats.verified = True
            return
        if self._from_disk:
            self.stats.rebuilt = f"stale (a fresh pass differs by {error:.3g})"
            rank_zero_warn(
                f"FeatureCache: the cached features in {self.path} differ from a fresh pass (max abs error {error:.3g}): the "
                "model or its code changed since they were written. Discarding them and rebuilding the cache."
            )
            self.store.clear()
            self._from_disk = False
            self.store.add(keys, fresh)
            self._dirty = True
            return
        raise RuntimeError(
            f"FeatureCache: the head's input for the same examples changed between passes (max abs error {error:.3g}), "
            "although everything computing it is frozen and in eval mode. Something random runs before the head (e.g. "
            "F.dropout or a random augmentation inside forward); move it into the head or drop FeatureCache."
        )

    def _save(self) -> None:
        if self.path is None or not self._dirty or not len(self.store):
            return
        self.store.save(self.path, self._meta)
        self._dirty = False
