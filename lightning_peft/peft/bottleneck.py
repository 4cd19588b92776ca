"""Bottleneck adapters: Houlsby (2019), Pfeiffer (2021) and parallel (He et al. 2022) placements.

One adapter is ``h + s·W_up·act(W_down·drop(h))`` with a bottleneck ``m ≪ d``; ``W_up`` and its
bias start at zero, so the wrapped model starts bit-exactly unchanged. The math runs through
:func:`lightning_peft.kernels.adapter_bottleneck` (fused Triton kernels on CUDA, PyTorch elsewhere).

Placements, per transformer block (tables below for BERT-style encoders, DistilBERT, HF ViT/DeiT,
GPT-2, Llama-style decoders and timm ViT; ``target_modules`` places them anywhere else):

- ``houlsby``: after the attention output projection and after the feed-forward output projection,
  before each residual add (+ LayerNorm) -- the adapter wraps those projections (mode ``output``).
- ``pfeiffer``: after the feed-forward output projection only.
- ``parallel``: a branch beside the feed-forward block, reading its input and added to its output
  (mode ``parallel``: the adapter wraps the FFN module, ``y = ffn(x) + s·branch(x)``). BERT-style
  encoders split the FFN over ``intermediate`` and ``output(hidden, input_tensor)``, which adds the
  residual ``input_tensor`` (the FFN input) before its LayerNorm; there the branch is added to that
  argument (mode ``residual_arg``: ``output(h, x + s·branch(x))`` = LayerNorm(ffn(x) + s·branch(x) + x)).

The adapters are nonlinear, so they cannot be merged into the base weights: ``merge`` refuses them
(``merge_blocker``) before changing anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..groups.matching import format_names, name_matches
from ..kernels import ACTIVATIONS, adapter_bottleneck
from ..utils.calls import bind_forward
from ..utils.names import is_inside
from .config import MethodConfig
from .layer import AdapterLayer
from .registry import Site, register_layer, register_method
from .targeting import (
    _model_key,
    base_module,
    hf_models,
    is_conv1d,
    is_linear,
    resolve_targets,
)

__all__ = ["BOTTLENECK_LAYOUTS", "PLACEMENTS", "AdapterConfig", "BlockLayout", "Bottleneck", "BottleneckLayer"]

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
MODES = ("output", "parallel", "residual_arg")


@dataclass(frozen=True)
class BlockLayout:
    """Where adapters go in one model family: the block list, and module paths relative to a block."""

    blocks: str  # the ModuleList (or Sequential) of transformer blocks (dotted suffix of its name)
    attention_output: str  # attention output projection (houlsby)
    ffn_output: str  # feed-forward output projection (houlsby, pfeiffer)
    ffn: str  # the feed-forward module a parallel branch runs beside
    ffn_mode: str = "parallel"  # "residual_arg": the FFN module takes (hidden, input_tensor) and adds input_tensor itself


_BERT = BlockLayout("encoder.layer", "attention.output.dense", "output.dense", "output", "residual_arg")
_LLAMA = BlockLayout("layers", "self_attn.o_proj", "mlp.down_proj", "mlp")
_VIT = BlockLayout("layers", "attention.o_proj", "mlp.fc2", "mlp")  # transformers 5.x ViT/DeiT
BOTTLENECK_LAYOUTS: dict[str, BlockLayout] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "camembert", "electra"], _BERT),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"], _LLAMA),
    **dict.fromkeys(["vit", "deit"], _VIT),
    "distilbert": BlockLayout("transformer.layer", "attention.out_lin", "ffn.lin2", "ffn"),
    "gpt2": BlockLayout("h", "attn.c_proj", "mlp.c_proj", "mlp"),
    "timm:VisionTransformer": BlockLayout("blocks", "attn.proj", "mlp.fc2", "mlp"),
}

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapter options.

    Args:
        placement: ``"houlsby"`` (after attention and FFN), ``"pfeiffer"`` (after the FFN) or
            ``"parallel"`` (a branch beside the FFN).
        bottleneck_size: ``m``; ``None`` = ``d // reduction_factor`` (at least 1).
        reduction_factor: ``d / m`` when ``bottleneck_size`` is ``None``.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
        dropout: dropout on the adapter's input.
        scale: ``s``, multiplies the adapter branch (He et al. use 4 for parallel adapters).
        layers: block indices to adapt (negative counts from the last); ``None`` = every block. The
            block of a module is the first number in its name (``encoder.layer.3.output.dense`` -> 3).
        target_modules: ``None`` = the placement table for the model type; patterns place adapters
            on those modules instead (after them, or beside them with ``placement="parallel"``).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from lightning_peft import AdapterConfig, count_parameters, inject
        >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
        >>> model = inject(bert, AdapterConfig(placement="pfeiffer", bottleneck_size=4))
        >>> count_parameters(model).trainable  # 2 blocks x (down 4x32 + 4, up 32x4 + 32)
        584
    """

    method = "bottleneck"

    placement: str = "houlsby"
    bottleneck_size: int | None = None
    reduction_factor: float = 16.0
    activation: str = "gelu"
    dropout: float = 0.0
    scale: float = 1.0
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig: unknown placement {self.placement!r}; choose one of {list(PLACEMENTS)}")
        if self.bottleneck_size is not None and (int(self.bottleneck_size) != self.bottleneck_size or self.bottleneck_size < 1):
            raise ValueError(f"AdapterConfig: bottleneck_size must be an integer >= 1 or None, got {self.bottleneck_size!r}")
        if not self.reduction_factor > 0:
            raise ValueError(f"AdapterConfig: reduction_factor must be > 0, got {self.reduction_factor!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig: unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.scale == 0:
            raise ValueError("AdapterConfig: scale=0 is invalid: the adapter branch and its gradients would be zero, so it never trains")
        if self.layers is not None:
            self.layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
            if not self.layers or any(int(i) != i for i in self.layers):
                raise ValueError(f"AdapterConfig: layers must be a non-empty list of block indices or None, got {self.layers!r}")


def _linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if is_linear(m)]


def _features(module: nn.Module, side: str) -> int:
    """Input features of the first linear layer (``side="in"``) or output features of the last (``"out"``)."""
    layers = _linears(module)
    layer = layers[0] if side == "in" else layers[-1]
    if is_conv1d(layer):
        in_f, out_f = layer.weight.shape
    else:  # the attributes, not the weight's shape: a 4-bit layer stores its weight packed
        in_f, out_f = getattr(layer, "in_features", layer.weight.shape[1]), getattr(layer, "out_features", layer.weight.shape[0])
    return int(in_f if side == "in" else out_f)


def _wrappable(module: nn.Module) -> bool:
    return bool(_linears(module))


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to: the first number in its qualified name."""
    found = _BLOCK_INDEX.search(name)
    return int(found.group(1)) if found else None


class Bottleneck(nn.Module):
    """One adapter: ``down`` (d -> m), ``up`` (m -> d, zero-initialised), activation, dropout, scale, mode."""

    def __init__(self, base: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.mode: str = spec["mode"]
        self.activation: str = spec["activation"]
        self.scale = float(spec["scale"])
        d, m = int(spec["dim"]), int(spec["bottleneck"])
        weight = next(base.parameters())
        # fp32 masters on a 16-bit base, and on a quantized one (whose stored weight is uint8/int8)
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype
        self.down = nn.Linear(d, m, device=weight.device, dtype=dtype)
        self.up = nn.Linear(m, d, device=weight.device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(spec["dropout"]) if spec.get("dropout", 0.0) > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + s·up(act(down(drop(x))))``, returned in the residual's dtype.

        Activations stay in their dtype (fp32 weights on a 16-bit base are masters: the kernel rounds their
        operands and returns fp32 gradients), and a serial adapter (``x is residual``, no active dropout)
        takes the kernel's residual-is-x path: ``y = x + s·adapter(x)`` in one pass, ``dx`` with ``dy`` folded in.
        """
        dtype, w = residual.dtype, self.down.weight.dtype
        half = (torch.float16, torch.bfloat16)
        if x.dtype != w and not (w == torch.float32 and x.dtype in half) and not torch.is_autocast_enabled(x.device.type):
            x, residual = x.to(w), (None if residual is x else residual.to(w))
            residual = x if residual is None else residual
        dropping = isinstance(self.dropout, nn.Dropout) and self.dropout.training
        serial = residual is x and not dropping
        out = adapter_bottleneck(
            x if serial else self.dropout(x), self.down.weight, self.down.bias, self.up.weight, self.up.bias,
            activation=self.activation, scale=self.scale, residual=None if serial else residual,
        )
        return out.to(dtype)


@register_layer
class BottleneckLayer(AdapterLayer):
    """A module with bottleneck adapters after it (``output``), beside it (``parallel``) or on its residual argument."""

    method = "bottleneck"

    def merge_blocker(self) -> str | None:
        return (
            "bottleneck adapters are nonlinear (h + s·W_up·act(W_down·h)) and cannot be folded into the base weights; "
            "keep them unmerged (merge and merge_and_unload refuse them)"
        )

    def _merge(self, name: str) -> None:
        raise RuntimeError(f"adapter {name!r}: {self.merge_blocker()}")

    @classmethod
    def make_adapter(cls, base: nn.Module, spec: dict[str, Any]) -> Bottleneck:
        if spec.get("mode") not in MODES:
            raise ValueError(f"unknown bottleneck adapter mode {spec.get('mode')!r}; expected one of {list(MODES)}")
        if not _wrappable(base):
            raise ValueError(f"a bottleneck adapter needs a module with a linear layer to size it, not {type(base).__name__}")
        return Bottleneck(base, spec)

    def _add_adapters(self, source: torch.Tensor | None, y: torch.Tensor, routes: list, mode: str) -> torch.Tensor:
        """Add each route's ``mode`` adapters to ``y``; they read ``source`` (``None``: the running ``y``, stacked)."""
        for names, index in routes:
            adapters = [self.adapters[n] for n in names if self.adapters[n].mode == mode]
            if not adapters:
                continue
            if index is not None:
                index = index.to(y.device)
                part = y.index_select(0, index)
                src = None if source is None else source.index_select(0, index)
                for adapter in adapters:
                    part = adapter(part if src is None else src, part)
                y = y.index_copy(0, index, part)
            else:
                for adapter in adapters:
                    y = adapter(y if source is None else source, y)
        return y

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = bind_forward(self.base_layer, args, kwargs)  # inputs may come by keyword (Llama: mlp(hidden_states=...))
        params = list(call.signature.parameters)
        x = call.arguments.get(params[0]) if params else None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"bottleneck adapters need a tensor as the first argument of {type(self.base_layer).__name__}.forward")
        routes = self.routes(x.shape[0])
        if not routes:
            return self.base_layer(*args, **kwargs)
        modes = {self.adapters[n].mode for names, _ in routes for n in names}
        if "residual_arg" in modes:
            residual = call.arguments.get(params[1]) if len(params) > 1 else None
            if not isinstance(residual, torch.Tensor):
                raise TypeError(
                    f"a residual_arg bottleneck adapter on {type(self.base_layer).__name__} needs the residual (the FFN input) "
                    "as the second argument, as in BERT's output(hidden_states, input_tensor)"
                )
            call.arguments[params[1]] = self._add_adapters(residual, residual, routes, "residual_arg")
        y = self.base_layer(*call.args, **call.kwargs)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"bottleneck adapters need a module returning a tensor; {type(self.base_layer).__name__} returned {type(y).__name__}")
        if "parallel" in modes:
            y = self._add_adapters(x, y, routes, "parallel")
        if "output" in modes:
            y = self._add_adapters(None, y, routes, "output")
        return y


def _layout_sites(model: nn.Module, config: AdapterConfig, candidates: list[tuple[str, nn.Module]], modes: dict[str, str]) -> list[str]:
    """The placement table's sites in every block of every recognised model (fills ``modes``)."""
    models = hf_models(model) or [(n, m) for n, m in [("", model), *candidates] if _model_key(m)][:1]
    if not models:
        raise ValueError(
            f"AdapterConfig: {type(model).__name__} holds no transformers or timm model with a known block layout; pass "
            "target_modules=[...] (module patterns) to place the adapters"
        )
    by_name = dict(candidates)
    names: list[str] = []
    for prefix, hf in models:
        key = _model_key(hf)
        layout = BOTTLENECK_LAYOUTS.get(key)
        if layout is None:
            raise ValueError(
                f"AdapterConfig: no block layout for model type {key!r} ({type(hf).__name__}); pass target_modules=[...]. "
                f"Layouts exist for: {', '.join(sorted(BOTTLENECK_LAYOUTS))}"
            )
        inside = [(n, m) for n, m in candidates if n != prefix and is_inside(prefix, n)]
        lists = [n for n, m in inside if isinstance(m, (nn.ModuleList, nn.Sequential)) and name_matches(layout.blocks, n)]
        if not lists:
            raise ValueError(f"AdapterConfig: found no block list {layout.blocks!r} in {type(hf).__name__} (model type {key!r})")
        parts = {
            "houlsby": [(layout.attention_output, "output"), (layout.ffn_output, "output")],
            "pfeiffer": [(layout.ffn_output, "output")],
            "parallel": [(layout.ffn, layout.ffn_mode)],
        }[config.placement]
        for blocks in lists:
            for i in range(len(model.get_submodule(blocks))):
                for rel, mode in parts:
                    name = f"{blocks}.{i}.{rel}"
                    if name not in by_name:
                        raise ValueError(f"AdapterConfig: the {key!r} layout expects {rel!r} in every block, but {name!r} is missing; pass target_modules=[...]")
                    names.append(name)
                    modes[name] = mode
    return names


def _select_layers(names: list[str], layers: list[int] | None) -> list[str]:
    if layers is None:
        return names
    present = sorted({i for i in map(block_index, names) if i is not None})
    if not present:
        raise ValueError(f"AdapterConfig: layers={layers} given, but the adapted modules carry no block index: {format_names(names)}")
    count = present[-1] + 1
    wanted = {count + i if i < 0 else i for i in layers}
    missing = sorted(i for i in wanted if i not in present)
    if missing:
        raise ValueError(f"AdapterConfig: layers {missing} are not among the blocks {present[0]}..{present[-1]} of the model")
    return [n for n in names if block_index(n) in wanted]


def plan_bottleneck(model: nn.Module, config: AdapterConfig, modules_to_save: list[str]) -> list[Site]:
    """Bottleneck sites: the placement table (or ``target_modules``) in the chosen blocks, each with its mode and width."""
    modes: dict[str, str] = {}
    names = resolve_targets(
        model, config, _wrappable, lambda candidates: _layout_sites(model, config, candidates, modes),
        "AdapterConfig target_modules", skip=modules_to_save,
    )
    names = _select_layers(names, config.layers)
    default_mode = "parallel" if config.placement == "parallel" else "output"
    sites = []
    for name in names:
        base = base_module(model.get_submodule(name))
        mode = modes.get(name, default_mode)
        dim = _features(base, "in" if mode == "parallel" else "out")
        if mode == "parallel" and _features(base, "out") != dim:
            raise ValueError(f"a parallel adapter beside {name!r} needs equal input and output widths, got {dim} -> {_features(base, 'out')}")
        bottleneck = int(config.bottleneck_size) if config.bottleneck_size is not None else max(1, int(dim // config.reduction_factor))
        spec = {"mode": mode, "dim": dim, "bottleneck": bottleneck, "activation": config.activation, "dropout": config.dropout, "scale": config.scale}
        sites.append(Site(name, "bottleneck", spec))
    return sites


register_method("bottleneck", AdapterConfig, plan_bottleneck)
