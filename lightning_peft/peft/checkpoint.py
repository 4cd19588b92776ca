"""Adapter-only Lightning checkpoints: drop the frozen base weights on save, take them from the live model on load.

The saved state keeps adapter tensors, parameters that train and buffers, plus a fingerprint of
the frozen pretrained weights (a hash: :func:`~lightning_peft.utils.fingerprint.tensors_fingerprint`)
and a description of the adapters (method, config, wrapped modules). A ``load_state_dict``
pre-hook on the module checks both and fills the frozen weights in from the model itself, so
Lightning's strict loading stays on for resume, ``validate`` and ``test`` alike. A mismatch is an
error saying what differs: the method, a config value (rank, alpha...), the wrapped modules, or the
base weights.

The fingerprint covers exactly the frozen pretrained weights, named as before injection: a
``modules_to_save`` original (a freshly initialised head, replaced by the adapter's copy) is left
out, so a resume with another seed is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..groups.matching import clean_name, format_names
from ..utils.fingerprint import tensors_fingerprint
from .functional import adapter_parameters, adapter_sites, list_adapters
from .layer import adapter_layers

__all__ = [
    "ADAPTERS_KEY",
    "FINGERPRINT_KEY",
    "AdapterOnlyCheckpoints",
    "adapter_differences",
    "adapter_only_state_dict",
    "base_fingerprint",
    "check_adapter_only_checkpoint",
    "describe_adapters",
    "state_base_fingerprint",
]

FINGERPRINT_KEY = "__lightning_peft__.base_fingerprint"  # uint8 tensor: the digest's bytes
ADAPTERS_KEY = "__lightning_peft__.adapters"  # uint8 tensor: UTF-8 JSON of describe_adapters()
_HOOK = "_lightning_peft_checkpoint_hook"
_CACHE = "_lightning_peft_base_fingerprint"


def pretrained_name(name: str) -> str:
    """A state-dict name as it was before injection (``q.base_layer.weight`` -> ``q.weight``)."""
    return ".".join(part for part in clean_name(name).split(".") if part != "base_layer")


def frozen_base_names(module: nn.Module) -> set[str]:
    """State-dict names of the frozen parameters that belong to no adapter (tied aliases included)."""
    adapters = {id(p) for p in adapter_parameters(module).values()}
    return {clean_name(n) for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad and id(p) not in adapters}


def _replaced_originals(module: nn.Module) -> set[int]:
    """Parameters of ``modules_to_save`` originals: frozen, but replaced by the adapter's copy (often freshly initialised)."""
    return {id(p) for _, layer in adapter_layers(module) if layer.method == "modules_to_save" for p in layer.base_layer.parameters()}


def base_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen pretrained weights, by their names before injection."""
    frozen = frozen_base_names(module)
    skip = _replaced_originals(module)
    return {
        pretrained_name(n): p for n, p in module.named_parameters(remove_duplicate=False)
        if clean_name(n) in frozen and id(p) not in skip
    }


def base_fingerprint(module: nn.Module) -> str:
    """A hex digest of the frozen pretrained weights (names before injection, dtypes, shapes, bytes)."""
    return tensors_fingerprint(base_weights(module))


def state_base_fingerprint(module: nn.Module, state_dict: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """The fingerprint the frozen pretrained weights stored in a full ``state_dict`` would have in ``module``;
    ``(None, missing names)`` when the state lacks some of them."""
    stored = {pretrained_name(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    names = base_weights(module)
    missing = sorted(n for n in names if n not in stored)
    if missing:
        return None, missing
    return tensors_fingerprint({n: stored[n] for n in names}), []


def describe_adapters(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Adapter name -> method, config and wrapped modules: what a checkpoint is compared against."""
    out = {}
    for name in list_adapters(module):
        config = next(layer.configs[name] for _, layer in adapter_layers(module) if name in layer.configs)
        out[name] = {"method": config.method, "config": config.to_dict(), "modules": sorted(s.module for s in adapter_sites(module, name))}
    return out


def adapter_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`describe_adapters` results, in words (empty when nothing does)."""
    problems = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            problems.append(f"the checkpoint has a {saved[name]['method']} adapter {name!r} the model does not have")
            continue
        if name not in saved:
            problems.append(f"the model has a {current[name]['method']} adapter {name!r} the checkpoint does not have")
            continue
        a, b = saved[name], current[name]
        if a["method"] != b["method"]:
            problems.append(f"adapter {name!r} is {a['method']} in the checkpoint but {b['method']} in the model")
            continue
        changed = [f"{k}={a['config'].get(k)!r} in the checkpoint vs {b['config'].get(k)!r}" for k in sorted(set(a["config"]) | set(b["config"]))
                   if a["config"].get(k) != b["config"].get(k)]
        if changed:
            problems.append(f"adapter {name!r} ({a['method']}) has " + ", ".join(changed))
        only_saved = sorted(set(a["modules"]) - set(b["modules"]))
        only_model = sorted(set(b["modules"]) - set(a["modules"]))
        if only_saved or only_model:
            parts = ([f"wraps {format_names(only_saved, 4)} only in the checkpoint"] if only_saved else []) + (
                [f"wraps {format_names(only_model, 4)} only in the model"] if only_model else [])
            problems.append(f"adapter {name!r} " + " and ".join(parts))
    return problems


def _encode(data: Any) -> torch.Tensor:
    return torch.tensor(list(json.dumps(data, sort_keys=True).encode()), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.cpu().tolist()).decode())


def _is_frozen_entry(key: str, frozen: set[str]) -> bool:
    """``key`` is a frozen parameter, or an entry stored under one (bitsandbytes' ``weight.absmax``, ``weight.quant_map``...)."""
    if key in frozen:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in frozen for i in range(1, len(parts)))


def adapter_only_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the frozen base parameters and what hangs off them (adapters, trainable parameters and
    buffers stay)."""
    frozen = frozen_base_names(module)
    return {k: v for k, v in state_dict.items() if not _is_frozen_entry(k, frozen)}


def _cached_fingerprint(module: nn.Module) -> str:
    value = module.__dict__.get(_CACHE)
    if value is None:
        value = base_fingerprint(module)
        module.__dict__[_CACHE] = value
    return value


class AdapterOnlyCheckpoints:
    """Attach to a module once its adapters are injected; then ``shrink`` each checkpoint being saved.

    With ``adapter_only=False`` checkpoints stay full; the loading hook still explains checkpoints
    that do not fit (an adapter-only checkpoint of another method or base, or a checkpoint without
    adapters loaded into an adapter run).
    """

    def __init__(self, adapter_only: bool = True) -> None:
        self.adapter_only = adapter_only

    def attach(self, module: nn.Module) -> None:
        """Register the loading hook (once per module) and, for adapter-only checkpoints, fingerprint the base now."""
        module.__dict__.pop(_CACHE, None)  # adapters changed: names of the frozen set may have too
        if module.__dict__.get(_HOOK) is None:
            module.__dict__[_HOOK] = module.register_load_state_dict_pre_hook(_check_and_fill)
        if self.adapter_only:
            _cached_fingerprint(module)

    def shrink(self, module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Replace ``checkpoint["state_dict"]`` by its adapter-only part plus the base fingerprint and adapter description."""
        if not self.adapter_only:
            return
        state = adapter_only_state_dict(module, checkpoint["state_dict"])
        state[FINGERPRINT_KEY] = torch.tensor(list(bytes.fromhex(_cached_fingerprint(module))), dtype=torch.uint8)
        state[ADAPTERS_KEY] = _encode(describe_adapters(module))
        checkpoint["state_dict"] = state


_RESUME_HINT = "Build the model as in the run that saved it (same pretrained weights, same adapter config) before loading it."


def _check_and_fill(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    saved = state_dict.pop(prefix + FINGERPRINT_KEY, None)
    described = state_dict.pop(prefix + ADAPTERS_KEY, None)
    if saved is None:
        _refuse_checkpoint_without_adapters(module, state_dict, prefix)
        return
    problems = adapter_differences(_decode(described), describe_adapters(module)) if described is not None else []
    if saved.dtype != torch.uint8:  # written by lightning_peft < 0.2 (float sums, head included): cannot be compared
        rank_zero_warn("This adapter-only checkpoint has an old-style base fingerprint; the base weights are not checked. "
                       "HINT: save it again to get the current check.")
    elif bytes(saved.cpu().tolist()).hex() != _cached_fingerprint(module):
        problems.append("it was trained on other base weights than the model now holds (the fingerprints of the frozen "
                        "pretrained weights differ: another checkpoint, revision or dtype of the pretrained model?)")
    if problems:
        raise ValueError("This adapter-only checkpoint does not fit the model: " + "; ".join(problems) + ". " + _RESUME_HINT)
    frozen = frozen_base_names(module)
    for name, value in module.state_dict().items():
        if _is_frozen_entry(name, frozen):
            state_dict.setdefault(prefix + name, value)


def _refuse_checkpoint_without_adapters(module: nn.Module, state_dict: Mapping[str, Any], prefix: str) -> None:
    """A full checkpoint of the model *without* adapters (full fine-tuning, or the pretrained weights) loaded into an adapter run."""
    if not list_adapters(module) or any(".adapters." in k for k in state_dict if k.startswith(prefix)):
        return
    expected = set(module.state_dict())
    wrapped = {pretrained_name(e): e for e in expected if pretrained_name(e) != e}
    plain = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in wrapped]
    if plain:
        raise ValueError(
            f"This checkpoint holds no adapter tensors and names the wrapped layers' weights as a model without adapters "
            f"does (e.g. {plain[0]!r} where the model has {wrapped[plain[0][len(prefix):]]!r}): it is a full fine-tuning "
            "or pretrained checkpoint, not one of this adapter run. To start the adapter from those weights, load them "
            "into the module before injection (module.load_state_dict(torch.load(path, weights_only=True)['state_dict'])) "
            "and fit without ckpt_path; to resume, pass a checkpoint saved by this run."
        )


def check_adapter_only_checkpoint(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Call from ``LightningModule.on_load_checkpoint``: an adapter-only checkpoint loaded into a module without its
    adapter (no ``PEFT`` callback in the Trainer) is an error that says so, instead of a dump of missing keys.

    Raises:
        ValueError: ``checkpoint`` is adapter-only and ``module`` has no adapter.
    """
    state = checkpoint.get("state_dict") or {}
    if FINGERPRINT_KEY not in state or list_adapters(module):
        return
    described = state.get(ADAPTERS_KEY)
    adapters = _decode(described) if isinstance(described, torch.Tensor) else {}
    what = "; ".join(
        f"{d['method']} adapter {n!r} ({', '.join(f'{k}={v!r}' for k, v in d['config'].items() if k in ('r', 'target_modules'))})"
        for n, d in adapters.items()
    ) or "an adapter"
    raise ValueError(
        f"This is an adapter-only checkpoint (saved with PEFT(..., adapter_only_checkpoint=True)) of {what}: it holds the "
        f"adapter, not the pretrained weights, and {type(module).__name__} has no adapter. Add the PEFT callback with the "
        "config it was saved with to the Trainer (it injects the adapter and fills in the pretrained weights) to resume, "
        "validate or test it, or call load_adapter(model, path) on the pretrained model."
    )
