"""Operations on a model with adapters: inject, switch, disable, delete, route per sample, merge.

Everything works in place on any ``nn.Module`` (a LightningModule, a ``transformers``/timm/torchvision
model) and finds its wrappers structurally; there is no model-level registry to keep in sync.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..groups.freezing import set_requires_grad
from ..groups.matching import clean_name, format_names
from ..utils.param_count import count_parameters
from .config import MethodConfig
from .layer import AdapterLayer, adapter_layers, validate_adapter_name
from .modules_to_save import ModulesToSaveLayer
from .quantization import quantized_merge_blocker
from .registry import LAYERS, Site, method_for
from .surgery import replace_module
from .targeting import (
    base_module,
    candidate_modules,
    hf_models,
    resolve_modules_to_save,
)

__all__ = [
    "active_adapters",
    "adapter_batch",
    "adapter_parameters",
    "adapter_sites",
    "adapter_state_dict",
    "apply_sites",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "list_adapters",
    "merge",
    "merge_and_unload",
    "place_adapter",
    "set_adapter",
    "unmerge",
    "unmerged",
]

log = logging.getLogger(__name__)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters in use (empty when none, or when all are disabled)."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        if not layer.disabled:
            names.update(dict.fromkeys(layer.active))
    return list(names)


def _require(model: nn.Module, names: Sequence[str]) -> None:
    known = list_adapters(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"No adapter named {format_names(missing)} on {type(model).__name__}; adapters: {format_names(known)}")


def apply_sites(model: nn.Module, sites: Sequence[Site], adapter_name: str, config: MethodConfig) -> None:
    """Wrap each site's module (or reuse its wrapper) and add the adapter; nothing changes if any site fails."""
    seen: set[str] = set()
    built = []
    for site in sites:
        if site.module in seen:
            raise ValueError(f"module {site.module!r} is targeted twice; make the target patterns disjoint")
        seen.add(site.module)
        try:
            module = model.get_submodule(site.module)
        except AttributeError:
            names = [n for n, _ in candidate_modules(model)]
            raise ValueError(f"No module {site.module!r} in {type(model).__name__}; modules: {format_names(names)}") from None
        layer_cls = LAYERS.get(site.layer)
        if layer_cls is None:
            raise ValueError(f"Unknown adapter layer {site.layer!r}; known: {sorted(LAYERS)}")
        if isinstance(module, AdapterLayer) and not isinstance(module, layer_cls):
            raise ValueError(
                f"module {site.module!r} already carries {module.method} adapters {list(module.adapters)}; one method "
                f"per module (exclude it with exclude_modules, or delete those adapters first)"
            )
        built.append((site.module, module, layer_cls, layer_cls.make_adapter(base_module(module), site.spec)))
    for name, module, layer_cls, adapter in built:
        layer = module
        if not isinstance(module, layer_cls):
            layer = layer_cls(module).train(module.training)
            replace_module(model, name, layer)
        adapter.train(layer.training)
        layer.add_adapter(adapter_name, adapter, config)
    for name, _, _, _ in built:
        model.get_submodule(name).link(model, name, adapter_name)


def place_adapter(
    model: nn.Module, sites: Sequence[Site], adapter_name: str, config: MethodConfig, fill: Callable[[], None] | None = None,
) -> None:
    """Wrap ``sites`` with adapter ``adapter_name``, fill it (``fill()``; on any error the adapter is removed again),
    freeze everything else and make it the active adapter: the one path of :func:`inject` and of loading adapter files."""
    apply_sites(model, sites, adapter_name, config)
    if fill is not None:
        try:
            fill()
        except BaseException:
            delete_adapter(model, adapter_name)
            raise
    set_requires_grad(model, False)  # only the adapter trains (and the modules_to_save copies with it)
    set_adapter(model, adapter_name)
    install_input_grad_hooks(model)


def inject(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` of ``config``'s method to ``model`` in place, make it the active one, and
    freeze everything else (the ``modules_to_save`` copies train with it).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from lightning_peft import LoRAConfig, inject, count_parameters
        >>> model = inject(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)), LoRAConfig(r=4))
        >>> count_parameters(model).trainable  # query and value of 2 layers: 4 * 4 * (32 + 32)
        1024

    Raises:
        ValueError: an unknown or invalid adapter name, a name already in use, or targets that match
            nothing (the message lists the modules that can be wrapped).
    """
    method = method_for(config)
    validate_adapter_name(adapter_name)
    if adapter_name in list_adapters(model):
        raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name or delete_adapter(model, {adapter_name!r}) first")
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise RuntimeError("Adapters are merged into the base weights; unmerge(model) before adding another")
    saved = resolve_modules_to_save(model, config)
    if method.prepare is not None:
        method.prepare(model, config, saved)
    sites = method.plan(model, config, saved) + [Site(n, "modules_to_save", {}) for n in saved]
    place_adapter(model, sites, adapter_name, config)
    counts = count_parameters(model)
    log.info(
        "%s adapter %r on %d modules (%s saved in full); %s of %s parameters train (%.2f%%)",
        method.name, adapter_name, len(sites) - len(saved), ", ".join(saved) or "none", f"{counts.trainable:,}", f"{counts.total:,}", counts.percent,
    )
    return model


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make these adapters the active ones (several LoRA adapters add up) and the only trainable ones."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    _require(model, names)
    for _, layer in adapter_layers(model):
        layer.set_active(names)
        for name, adapter in layer.adapters.items():
            set_requires_grad(adapter, name in names)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are taken out and put back after)."""
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [(layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, previous):
            layer.disabled = disabled
            layer.merge(merged)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; wrappers left without adapters give their place back to the base layer."""
    _require(model, [adapter_name])
    for name, layer in list(adapter_layers(model)):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            if not layer.adapters:
                replace_module(model, name, layer.base_layer)


@contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Route sample ``i`` of each batch through adapter ``adapter_names[i]`` (``None``: the base model).

    One deployment serving many users: their requests share a batch, each with its own adapter.
    The batch must lie along dimension 0 of every wrapped layer's input (true of transformers, timm
    and torchvision models).
    """
    names = list(adapter_names)
    _require(model, sorted({n for n in names if n is not None}))
    layers = [layer for _, layer in adapter_layers(model)]
    previous = [layer.routing for layer in layers]
    try:
        for layer in layers:
            layer.routing = names
        yield model
    finally:
        for layer, routing in zip(layers, previous):
            layer.routing = routing


def _tied_elsewhere(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return {k: v for k, v in owners.items() if len(v) > 1}


def merge_refusal(model: nn.Module, adapter_names: Sequence[str] | None = None, dequantized: bool = False) -> str | None:
    """Why :func:`merge` would refuse to fold these adapters (default: the active ones) in, or ``None``.

    Checked before anything changes: a layer whose adapters cannot be folded (bottleneck adapters, prompts;
    a quantized base unless ``dequantized``, i.e. the caller dequantizes it first), and a wrapped weight tied
    to another module (e.g. input embeddings shared with the LM head), which merging would change too.
    """
    if adapter_names is not None:
        _require(model, list(adapter_names))
    layers = [(name, layer) for name, layer in adapter_layers(model) if any(n in layer.adapters for n in (adapter_names or layer.active))]
    blocked = []
    for name, layer in layers:
        reason = layer.merge_blocker()
        if reason is not None and not (dequantized and reason == quantized_merge_blocker(layer.base_layer)):
            blocked.append((name, reason))
    if blocked:
        listing = "; ".join(f"{name}: {reason}" for name, reason in blocked[:4]) + (f"; ... ({len(blocked) - 4} more)" if len(blocked) > 4 else "")
        return f"Cannot merge: {listing}"
    tied = _tied_elsewhere(model)
    for name, layer in layers:
        if isinstance(layer, ModulesToSaveLayer) or layer.merges_tied_weights:
            continue
        for param in layer.base_layer.parameters(recurse=False):
            if id(param) in tied:
                return (
                    f"Cannot merge into {name!r}: its weight is shared with {format_names(tied[id(param)])}, so merging "
                    "would change those too. Keep this adapter unmerged (or exclude the module from the targets)."
                )
    return None


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights: base-model speed, same outputs.

    Raises:
        RuntimeError: :func:`merge_refusal`'s reason (nonlinear adapters or prompts, a quantized base, a
            wrapped weight tied to another module); nothing is changed then.
    """
    if (refusal := merge_refusal(model, adapter_names)) is not None:
        raise RuntimeError(refusal)
    for _, layer in adapter_layers(model):
        layer.merge(list(adapter_names) if adapter_names is not None else None)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


@contextmanager
def unmerged(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, no adapter is merged; merged ones are merged back after."""
    layers = [(layer, layer.merged) for _, layer in adapter_layers(model)]
    for layer, _ in layers:
        layer.unmerge()
    try:
        yield model
    finally:
        for layer, merged in layers:
            layer.merge(merged)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put plain layers back (modules saved in full keep the active copy)."""
    merge(model)
    for name, layer in list(adapter_layers(model)):
        if isinstance(layer, ModulesToSaveLayer):
            keep = layer.adapters[layer.active[0]] if layer.active and not layer.disabled else layer.base_layer
        else:
            keep = layer.base_layer
        replace_module(model, name, keep)
    return model


def _form(adapter: nn.Module, inference: bool) -> nn.Module:
    """The adapter itself, or with ``inference`` its inference form when it has one (``inference_form()``:
    e.g. a prompt encoder's final prompts, without the encoder that produced them in training)."""
    make = getattr(adapter, "inference_form", None)
    return make() if inference and callable(make) else adapter


def adapter_sites(model: nn.Module, adapter_name: str, inference: bool = False) -> list[Site]:
    """Where ``adapter_name`` sits: one site per wrapped module, with the spec that rebuilds it (its inference form's with ``inference``)."""
    return [
        Site(clean_name(name), layer.method, dict(getattr(_form(layer.adapters[adapter_name], inference), "spec", {})))
        for name, layer in adapter_layers(model) if adapter_name in layer.adapters
    ]


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", inference: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed ``<module>.<tensor>`` (e.g. ``encoder.layer.0.attention.self.query.lora_A``).

    Keys hold no adapter name -- they are built from the structure, so an adapter called like a
    module (``mlp``) cannot lose tensors on save (peft #3584). ``inference=True`` gives the tensors of
    the adapters' inference forms (what :func:`~lightning_peft.save_adapter` writes).
    """
    _require(model, [adapter_name])
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            for key, value in _form(layer.adapters[adapter_name], inference).state_dict().items():
                out[clean_name(f"{name}.{key}")] = value
    return out


def adapter_parameters(model: nn.Module, adapter_names: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter of the adapters (default: all of them), as ``model.named_parameters`` names it."""
    wanted = {id(p) for _, layer in adapter_layers(model) for n, a in layer.adapters.items() if adapter_names is None or n in adapter_names for p in a.parameters()}
    return {clean_name(n): p for n, p in model.named_parameters() if id(p) in wanted}


# --- gradient checkpointing: the `enable_input_require_grads` trap ----------------------------------


def install_input_grad_hooks(model: nn.Module) -> None:
    """Make input embeddings' outputs require grad while a ``transformers`` model checkpoints activations.

    With re-entrant activation checkpointing, a block whose inputs do not require grad gives no
    gradient to the adapters inside it, silently. The hook fixes that for every ``transformers``
    model in ``model``, whenever checkpointing is (or later gets) switched on.
    """
    for _, hf in hf_models(model):
        if getattr(hf, "_lightning_peft_grad_hook", None) is not None:
            continue
        get = getattr(hf, "get_input_embeddings", None)
        try:
            embeddings = get() if callable(get) else None
        except NotImplementedError:
            embeddings = None
        if not isinstance(embeddings, nn.Module):
            continue
        flags = [m for m in hf.modules() if hasattr(m, "gradient_checkpointing")]
        ref = weakref.ref(hf)

        def hook(module: nn.Module, inputs: Any, output: Any, flags: list[nn.Module] = flags, ref: Any = ref) -> None:
            if (
                torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point()
                and not output.requires_grad and ref() is not None and any(getattr(m, "gradient_checkpointing", False) for m in flags)
            ):
                output.requires_grad_(True)

        hf._lightning_peft_grad_hook = embeddings.register_forward_hook(hook)
