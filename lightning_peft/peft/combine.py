"""A new LoRA adapter from a weighted combination of trained ones (task arithmetic, TIES, DARE, concatenation, SVD).

:func:`add_weighted_adapter` follows Hugging Face PEFT's ``LoraModel.add_weighted_adapter``: on each layer the
adapters' factors are combined (``linear``/``ties``/``dare_*``/``magnitude_prune``: A and B each, weighted by
±sqrt(|w·s|)), stacked (``cat``: exact, rank = Σ ranks) or their full updates s·B·A combined and truncated by SVD
(``svd`` and the ``*_svd`` variants). The result has scale 1 (alpha = r) and is an ordinary adapter:
``set_adapter``, ``merge``, ``save_adapter`` and ``export_peft`` work on it. Negative weights subtract a task.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..groups.matching import format_names
from .functional import _require, apply_sites, delete_adapter
from .layer import AdapterLayer, adapter_layers, validate_adapter_name
from .lora import LoRA, LoRAConfig
from .lora_init import base_changing
from .registry import Site
from .task_arithmetic import COMBINATIONS, SignMethod, combine

__all__ = ["add_weighted_adapter"]


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
) -> str:
    """Add LoRA adapter ``adapter_name``, the combination of ``adapters`` (already on ``model``) with ``weights``.

    Args:
        combination_type: ``"linear"`` (all ranks equal; cheap, approximate: Σ√w·A times Σ√w·B), ``"cat"`` (exact:
            the factors stacked, rank Σ r_i), ``"svd"`` (exact Σ w·s·B·A truncated to ``svd_rank``), ``"ties"``,
            ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` (on the factors, equal ranks, need ``density``)
            and their ``*_svd`` forms (on the full updates). One adapter always combines linearly, as in PEFT.
        svd_rank: rank of an SVD result (default: the largest rank among ``adapters``); ``svd_clamp``: clamp
            the SVD factors to this quantile of their entries; ``svd_full_matrices``/``svd_driver``: passed to
            ``torch.linalg.svd``.
        density: fraction of entries kept by TIES/DARE/magnitude pruning, in [0, 1]. DARE draws its masks
            from torch's global RNG (seed it to repeat a result); building the new adapter draws nothing.
        majority_sign_method: ``"total"`` or ``"frequency"``: how TIES elects each entry's sign.

    The new adapter is frozen and not activated (call ``set_adapter``). A module saved in full
    (``modules_to_save``) or token rows trained (``trainable_token_indices``) by one of ``adapters`` are copied
    from that adapter (PEFT starts them afresh from the base model); two adapters training the same module
    or rows cannot be combined. Returns ``adapter_name``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from lightning_peft import LoRAConfig, inject, add_weighted_adapter, set_adapter
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
        >>> model = inject(inject(model, LoRAConfig(r=4), "task_a"), LoRAConfig(r=2), "task_b")
        >>> add_weighted_adapter(model, ["task_a", "task_b"], [1.0, -0.5], "a_minus_b", combination_type="cat")
        'a_minus_b'
        >>> model.encoder.layer[0].attention.self.query.adapters["a_minus_b"].lora_A.shape  # rank 4 + 2
        torch.Size([6, 32])
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    kind, density = _check_arguments(model, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    if len(adapters) == 1:
        kind, combination_type = "factors", "linear"
    configs = _lora_configs(model, adapters)
    ranks = _ranks(model, adapters)
    if kind == "factors" and len(set(ranks.values())) > 1:
        raise ValueError(f"combination_type={combination_type!r} needs adapters of one rank, got ranks {ranks}; "
                         "use 'cat' or 'svd' (or an '*_svd' variant) for adapters of different ranks")
    new_rank = {"factors": max(ranks.values()), "cat": sum(ranks.values()), "svd": svd_rank or max(ranks.values())}[kind]
    base = combination_type.removesuffix("_svd")
    svd_options = {"clamp": svd_clamp, "full_matrices": svd_full_matrices, "driver": svd_driver}

    sites: list[Site] = []
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, nn.Module] = {}
    rows: dict[str, torch.Tensor] = {}  # trainable tokens: module -> the rows copied from the one adapter that has them
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
            if not present:
                continue
            if layer.method == "modules_to_save":
                if len(present) > 1:
                    raise ValueError(f"adapters {[a for a, _ in present]} each train their own copy of {name!r} (modules_to_save); "
                                     "such copies cannot be combined: combine adapters that save different modules or none")
                saved[name] = layer.adapters[present[0][0]]
                sites.append(Site(name, "modules_to_save", {}))
                continue
            if layer.method == "trainable_tokens":
                if len(present) > 1:
                    raise ValueError(f"adapters {[a for a, _ in present]} each train token rows of {name!r} (trainable_token_indices); "
                                     "such rows cannot be combined: combine adapters of which at most one trains tokens")
                source = layer.adapters[present[0][0]]
                sites.append(Site(name, "trainable_tokens", dict(source.spec)))
                if not source.tied:
                    rows[name] = source.rows.detach()
                continue
            loras = [layer.adapters[a] for a, _ in present]
            ws = [w for _, w in present]
            if kind == "cat":
                a, b = _cat(loras, ws, new_rank)
            elif kind == "svd":
                a, b = _svd(loras, ws, base, new_rank, density, majority_sign_method, **svd_options)
            else:
                a, b = _factors(loras, ws, base, density, majority_sign_method)
            first = loras[0]
            spec = {"kind": first.kind, "r": int(a.shape[0]), "alpha": float(a.shape[0]), "dropout": first.spec.get("dropout", 0.0),
                    "rslora": False, "init": first.spec.get("init", "kaiming"), "adapter_dtype": first.spec.get("adapter_dtype", "float32"),
                    "bias": False}
            sites.append(Site(name, "lora", spec))
            tensors[name] = {"lora_A": a, "lora_B": b}
    config = dataclasses.replace(
        configs[0], r=new_rank, alpha=float(new_rank), use_rslora=False, rank_pattern={}, alpha_pattern={}, bias="none",
        target_modules=[s.module for s in sites if s.layer == "lora"], exclude_modules=None, modules_to_save=list(saved) or None,
        trainable_token_indices={s.module: s.spec["indices"] for s in sites if s.layer == "trainable_tokens" and s.module in rows} or None,
        target_parameters=None,
    )
    tensors.update({name: {"rows": value} for name, value in rows.items()})
    _place(model, sites, adapter_name, config, tensors, saved)
    return adapter_name


def _check_arguments(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str,
                     density: float | None, majority_sign_method: str) -> tuple[str, float | None]:
    if not adapters:
        raise ValueError("add_weighted_adapter: adapters is empty; name the adapters to combine")
    _require(model, adapters)
    validate_adapter_name(adapter_name)
    if adapter_name in {n for _, layer in adapter_layers(model) for n in layer.adapters}:
        raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name or delete_adapter(model, {adapter_name!r}) first")
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {weights}")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"unknown combination_type={combination_type!r}; choose one of {list(COMBINATIONS)}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"unknown majority_sign_method={majority_sign_method!r}; choose one of ['total', 'frequency']")
    kind, needs_density = COMBINATIONS[combination_type]
    if needs_density and len(adapters) > 1 and (density is None or not 0.0 <= density <= 1.0):
        raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1] (the fraction of entries kept), got {density!r}")
    merged = [name for name, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"Adapters are merged into the base weights of {format_names(merged)}; unmerge(model) before combining")
    return kind, density


def _lora_configs(model: nn.Module, adapters: list[str]) -> list[LoRAConfig]:
    """Each adapter's config; only plain LoRA layers (and modules saved in full) can be combined."""
    configs: dict[str, LoRAConfig] = {}
    for name, layer in adapter_layers(model):
        for adapter in adapters:
            if adapter not in layer.adapters:
                continue
            configs.setdefault(adapter, layer.configs[adapter])
            if layer.method in ("modules_to_save", "trainable_tokens"):
                continue
            module = layer.adapters[adapter]
            if layer.method == "lora_param":
                raise ValueError(f"adapter {adapter!r} has LoRA on parameters (target_parameters) at {name!r}; add_weighted_adapter "
                                 "combines LoRA on modules only (as PEFT)")
            if layer.method != "lora" or not isinstance(module, LoRA) or not isinstance(layer.configs[adapter], LoRAConfig):
                raise ValueError(f"adapter {adapter!r} has a {layer.method} layer at {name!r}; add_weighted_adapter combines LoRA adapters only")
            if module.dora:
                raise ValueError(f"adapter {adapter!r} is a DoRA adapter at {name!r}: its magnitude vector has no weighted "
                                 "combination; combine plain LoRA adapters (use_dora=False)")
            if base_changing(layer.configs[adapter].init):
                raise ValueError(f"adapter {adapter!r} was initialised with init={layer.configs[adapter].init!r}, which moved part "
                                 "of the base weight into it; combine adapters that leave the base untouched (init='kaiming' or 'gaussian')")
            if module.bias_delta is not None:
                raise ValueError(f"adapter {adapter!r} trains the bias of {name!r} (LoRAConfig(bias=...)); trained biases cannot be "
                                 "combined: combine adapters trained with bias='none'")
    return [configs[a] for a in adapters]


def _ranks(model: nn.Module, adapters: list[str]) -> dict[str, int]:
    """Each adapter's largest rank (as PEFT: r, or the largest of its rank_pattern)."""
    ranks: dict[str, int] = {}
    for _, layer in adapter_layers(model):
        for adapter in adapters:
            if adapter in layer.adapters and isinstance(layer.adapters[adapter], LoRA):
                ranks[adapter] = max(ranks.get(adapter, 0), int(layer.adapters[adapter].lora_A.shape[0]))
    return {a: ranks[a] for a in adapters if a in ranks}


def _cat(loras: list[LoRA], weights: list[float], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [w_i·s_i·A_i] stacked on the rank axis, B = [B_i] beside each other; zero-padded to ``rank``.

    A (rank, in[, kh, kw]), B (out, rank[, 1, 1]): B·A = Σ w_i·s_i·B_i·A_i exactly."""
    a = torch.cat([lora.lora_A.detach() * w * lora.scale for lora, w in zip(loras, weights)], dim=0)
    b = torch.cat([lora.lora_B.detach() for lora in loras], dim=1)
    out_a = a.new_zeros((rank, *a.shape[1:]))
    out_b = b.new_zeros((b.shape[0], rank, *b.shape[2:]))
    out_a[: a.shape[0]], out_b[:, : b.shape[1]] = a, b
    return out_a, out_b


def _factors(loras: list[LoRA], weights: list[float], base: str, density: float | None, sign: SignMethod) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the A factors with weights sign·√|w·s| and the B factors with √|w·s| (PEFT's split of w·s over both)."""
    roots = [math.sqrt(abs(w * lora.scale)) for lora, w in zip(loras, weights)]
    w_a = torch.tensor([r * (1 if w * lora.scale >= 0 else -1) for r, lora, w in zip(roots, loras, weights)])
    w_b = torch.tensor(roots)
    dtype = loras[0].lora_A.dtype
    a = combine(base, [lora.lora_A.detach() for lora in loras], w_a, density, sign)
    b = combine(base, [lora.lora_B.detach() for lora in loras], w_b, density, sign)
    return a.to(dtype), b.to(dtype)


def _svd(loras: list[LoRA], weights: list[float], base: str, rank: int, density: float | None, sign: SignMethod,
         clamp: float | None, full_matrices: bool, driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the full updates s·B·A (laid out like the base weight), then B = U·S and A = Vh of the top ``rank``."""
    first = loras[0]
    dtype = first.lora_A.dtype
    deltas = [lora.delta_weight().to(dtype) for lora in loras]
    delta = combine(base, deltas, torch.tensor(weights), density, sign)
    if first.kind == "conv2d":
        delta = delta.flatten(1)
    elif first.kind in ("conv1d", "embedding"):
        delta = delta.T  # to (out, in): the orientation of B·A
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    if first.kind == "conv2d":
        u = u.reshape(u.shape[0], u.shape[1], 1, 1)
        vh = vh.reshape(vh.shape[0], *first.lora_A.shape[1:])
    return vh.to(dtype), u.to(dtype)


def _place(model: nn.Module, sites: list[Site], adapter_name: str, config: LoRAConfig,
           tensors: dict[str, dict[str, torch.Tensor]], saved: dict[str, nn.Module]) -> None:
    """Add the adapter at ``sites`` and copy the combined tensors in; frozen, not activated; nothing left on failure."""
    with torch.random.fork_rng(devices=[]):  # the new adapter's init must not move the RNG stream (DARE's masks use it)
        apply_sites(model, sites, adapter_name, config)
    try:
        with torch.no_grad():
            for name, parts in tensors.items():
                adapter = model.get_submodule(name).adapters[adapter_name]
                for key, value in parts.items():
                    getattr(adapter, key).copy_(value)
            for name, source in saved.items():
                layer: AdapterLayer = model.get_submodule(name)
                layer.adapters[adapter_name] = copy.deepcopy(source)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            layer.adapters[adapter_name].requires_grad_(False)
