"""LoRA on parameters (PEFT's ``target_parameters``): low-rank updates of weights that are no ``nn.Linear``, such as
the 3-D expert stacks (experts, out, in) of mixture-of-experts blocks (Mixtral, Qwen3-MoE, GPT-OSS in transformers 5).

``LoRAConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"])`` wraps the module owning each
parameter; its forward runs the module with ``W + ΔW`` in place of ``W`` (``torch.func.functional_call``: the
module's own code, whatever experts kernel it uses, sees the updated weight). Per expert e,
``ΔW_e = s·B_e·A_e`` with PEFT's layout: ``lora_A`` (E·r, in) holds A_e in rows e·r..e·r+r-1 and ``lora_B``
(out, r·E) holds B_e in columns e, E+e, 2E+e, ... (column k·E+e is rank k of expert e). Weights stored
(E, in, out) (``is_transposed`` modules, GPT-OSS) get ΔW_eᵀ; 2-D parameters are one expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..groups.matching import format_names
from .layer import AdapterLayer
from .registry import Site, register_layer, register_peft_exporter
from .targeting import base_module, candidate_modules, pattern_value

__all__ = ["LoRAParamLayer", "ParamFactors", "ParamLoRA", "match_parameters", "plan_lora_parameters"]


def _layout(param: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(experts, in, out) of the map a parameter stands for (PEFT's reading of its shape)."""
    if param.dim() == 2:
        return 1, param.shape[1], param.shape[0]
    if param.dim() == 3:
        experts, d1, d2 = param.shape
        return (experts, d1, d2) if transposed else (experts, d2, d1)
    raise ValueError(f"LoRA on parameters needs a 2-D or 3-D parameter, got shape {tuple(param.shape)}")


class ParamFactors(nn.Module):
    """The LoRA factors of one parameter: ``lora_A`` (E·r, in), ``lora_B`` (out, r·E), scale s."""

    def __init__(self, param: torch.Tensor, r: int, alpha: float, rslora: bool, transposed: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.experts, d_in, d_out = _layout(param, transposed)
        self.r, self.ndim, self.transposed = r, param.dim(), transposed
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(self.experts * r, d_in, device=param.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r * self.experts, device=param.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW laid out like the parameter: (E, out, in), or (E, in, out) when transposed, or (out, in) for 2-D."""
        a, b = (self.lora_A, self.lora_B) if dtype is None else (self.lora_A.to(dtype), self.lora_B.to(dtype))
        if self.ndim == 2:
            return (b @ a) * self.scale
        a = a.reshape(self.experts, self.r, -1)  # (E, r, in)
        b = b.reshape(b.shape[0], self.r, self.experts).permute(2, 0, 1)  # (E, out, r)
        delta = torch.bmm(b, a) * self.scale  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta


class ParamLoRA(nn.Module):
    """One adapter on one module: :class:`ParamFactors` per targeted parameter name (``factors[name]``)."""

    def __init__(self, base: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        transposed = bool(getattr(base, "is_transposed", False))
        self.factors = nn.ModuleDict()
        for name, options in spec["params"].items():
            param = getattr(base, name, None)
            if not isinstance(param, torch.Tensor):
                raise ValueError(f"{type(base).__name__} has no parameter {name!r} for LoRA on parameters")
            dtype = torch.float32 if spec.get("adapter_dtype", "float32") == "float32" and param.dtype in (torch.float16, torch.bfloat16) else param.dtype
            self.factors[name] = ParamFactors(param, int(options["r"]), float(options["alpha"]), bool(spec.get("rslora")), transposed, dtype)


@register_layer
class LoRAParamLayer(AdapterLayer):
    """A module run with ``W + Σ_active ΔW`` for each targeted parameter W (or with the merged weights alone)."""

    method = "lora_param"

    @classmethod
    def make_adapter(cls, base: nn.Module, spec: dict[str, Any]) -> ParamLoRA:
        return ParamLoRA(base, spec)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is not None and not self.disabled:
            raise ValueError("adapter_batch (an adapter per sample) cannot route LoRA on parameters: the module sees "
                             "tokens of the whole batch mixed (e.g. experts), not samples; use set_adapter")
        names = [] if self.disabled else [n for n in self.active if n not in self.merged and n in self.adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        weights: dict[str, torch.Tensor] = {}
        for name in names:
            for pname, factors in self.adapters[name].factors.items():
                weight = weights.get(pname, getattr(self.base_layer, pname))
                weights[pname] = weight + factors.delta_weight().to(weight.dtype)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def _merge(self, name: str) -> None:
        for pname, factors in self.adapters[name].factors.items():
            weight = getattr(self.base_layer, pname)
            weight.add_(factors.delta_weight(torch.float32).to(weight.dtype))

    def _unmerge(self, name: str) -> None:
        for pname, factors in self.adapters[name].factors.items():
            weight = getattr(self.base_layer, pname)
            weight.sub_(factors.delta_weight(torch.float32).to(weight.dtype))


def _parameter_candidates(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, str]]:
    """(module, parameter) of every 2-D/3-D parameter owned directly by a module, outside ``skip`` subtrees."""
    out = []
    for name, module in candidate_modules(model):
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        for pname, param in base_module(module).named_parameters(recurse=False):
            if param.dim() in (2, 3):
                out.append((name, pname))
    return out


def match_parameters(model: nn.Module, patterns: Sequence[str], skip: Sequence[str] = ()) -> dict[str, list[str]]:
    """Module -> names of its parameters selected by ``patterns`` (PEFT's rule: ``<module>.<param>`` equals a
    pattern or ends with ``.<pattern>``), parameters in the module's order; a pattern selecting nothing raises."""
    candidates = _parameter_candidates(model, skip)
    selected: dict[str, list[str]] = {}
    for pattern in patterns:
        hits = [(m, p) for m, p in candidates if f"{m}.{p}" == pattern or f"{m}.{p}".endswith("." + pattern)]
        if not hits:
            raise ValueError(f"LoRA target_parameters pattern {pattern!r} matched no parameter of {type(model).__name__}; "
                             f"2-D/3-D parameters: {format_names([f'{m}.{p}' for m, p in candidates])}")
        for module, pname in hits:
            selected.setdefault(module, [])
            if pname not in selected[module]:
                selected[module].append(pname)
    order = {(m, p): i for i, (m, p) in enumerate(candidates)}
    return {m: sorted(ps, key=lambda p: order[(m, p)]) for m, ps in sorted(selected.items(), key=lambda kv: order[(kv[0], kv[1][0])])}


def plan_lora_parameters(model: nn.Module, config: Any, modules_to_save: Sequence[str], taken: Sequence[str]) -> list[Site]:
    """One site per module owning parameters of ``config.target_parameters`` (none when it is ``None``)."""
    if not config.target_parameters:
        return []
    if config.dropout:
        raise ValueError(f"LoRAConfig: dropout={config.dropout} cannot apply to target_parameters (the update is added to "
                         "the weight, not to an input branch); set dropout=0, as PEFT requires")
    if config.bias != "none":
        raise ValueError(f"LoRAConfig: bias={config.bias!r} is not supported with target_parameters; use bias='none'")
    sites = []
    for module, params in match_parameters(model, config.target_parameters, modules_to_save).items():
        if module in taken:
            raise ValueError(f"LoRA target_parameters: {module!r} is also a LoRA target module; wrap it with target_modules "
                             "or its parameters with target_parameters, not both")
        options = {p: {"r": int(pattern_value(f"{module}.{p}", config.rank_pattern, config.r)),
                       "alpha": float(pattern_value(f"{module}.{p}", config.alpha_pattern, config.alpha))} for p in params}
        sites.append(Site(module, "lora_param", {"params": options, "rslora": config.use_rslora, "adapter_dtype": config.adapter_dtype}))
    return sites


def peft_param_keys(key: str, names: Sequence[str]) -> dict[str, str]:
    """PEFT's key prefix of each parameter's factors: its ParamWrappers nest, the module's first targeted parameter
    innermost (``<module>.base_layer.base_layer...``), the last outermost (``<module>``)."""
    return {name: key + ".base_layer" * (len(names) - 1 - i) for i, name in enumerate(names)}


def export_param_lora_peft(layer: AdapterLayer, adapter: nn.Module, key: str) -> dict[str, torch.Tensor]:
    """PEFT's tensors for LoRA on parameters: ``<prefix>.lora_A.weight`` (E·r, in) and ``.lora_B.weight`` (out, r·E)."""
    order = [n for n, _ in layer.base_layer.named_parameters(recurse=False) if n in adapter.factors]  # the module's order, as PEFT nests
    prefixes = peft_param_keys(key, order)
    out = {}
    for name, factors in adapter.factors.items():
        out[f"{prefixes[name]}.lora_A.weight"], out[f"{prefixes[name]}.lora_B.weight"] = factors.lora_A, factors.lora_B
    return out


register_peft_exporter("lora_param", export_param_lora_peft)
