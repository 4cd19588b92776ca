"""IA3 (Liu et al. 2022): learned rescaling vectors, initialised to ones.

On keys and values the vector scales the layer's output, y = base(x) ⊙ l (l: (out,)); on the
feed-forward output projection it scales the input, y = base(x ⊙ l) (l: (in,)), i.e. the FFN
activations. Wraps ``nn.Linear`` and GPT-2's ``Conv1D``; merging multiplies the weight's rows
(output scaling, bias too) or columns (input scaling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..groups.matching import name_matches
from .config import MethodConfig
from .layer import AdapterLayer
from .quantization import is_quantized, keep_layout, quantized_merge_blocker
from .registry import Site, register_layer, register_method
from .targeting import is_conv1d, is_linear, resolve_targets

__all__ = ["IA3", "IA3_DEFAULTS", "IA3Config", "IA3Layer"]

_BERT_FFN_OUT = r"re:.*layer\.\d+\.output\.dense"
# model type -> (target modules, of which feed-forward modules)
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "camembert", "electra", "vit", "deit"], (["key", "value", _BERT_FFN_OUT], [_BERT_FFN_OUT])),
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"], (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "timm:VisionTransformer": (["qkv", "mlp.fc2"], ["mlp.fc2"]),
}


@dataclass
class IA3Config(MethodConfig):
    """IA3 options.

    Args:
        feedforward_modules: patterns of targets whose *input* is scaled (the FFN output projection);
            ``None`` = the defaults for the model type when ``target_modules`` is ``None``, else none.
        init_ones: start the vectors at 1 (the model starts unchanged); ``False`` draws them near 1 (tests).
    """

    method = "ia3"

    feedforward_modules: list[str] | None = None
    init_ones: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, str):
            self.feedforward_modules = [self.feedforward_modules]
        if self.feedforward_modules is not None:
            self.feedforward_modules = list(self.feedforward_modules)


class IA3(nn.Module):
    """One IA3 vector ``ia3_l`` on one layer: (in,) when it scales the input, else (out,)."""

    def __init__(self, base: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.feedforward = bool(spec["feedforward"])
        in_f, out_f = (base.weight.shape if is_conv1d(base) else base.weight.shape[::-1])
        weight = base.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.ia3_l = nn.Parameter(torch.ones(in_f if self.feedforward else out_f, device=weight.device, dtype=dtype))
        if not spec.get("init_ones", True):
            with torch.no_grad():
                self.ia3_l.add_(torch.randn_like(self.ia3_l) * 0.1)


@register_layer
class IA3Layer(AdapterLayer):
    """A linear layer rescaled by IA3 vectors: ``base(x) ⊙ Π l`` or ``base(x ⊙ Π l)`` over the active adapters."""

    method = "ia3"

    @classmethod
    def make_adapter(cls, base: nn.Module, spec: dict[str, Any]) -> IA3:
        if not is_linear(base):
            raise ValueError(f"IA3 wraps nn.Linear and Conv1D layers, not {type(base).__name__}")
        if is_quantized(base):
            keep_layout(base)  # wrapped: its storage must stay as quantized (saving, merging)
        return IA3(base, spec)

    def _scale(self, names: tuple[str, ...], feedforward: bool, like: torch.Tensor) -> torch.Tensor | None:
        vectors = [self.adapters[n].ia3_l for n in names if self.adapters[n].feedforward == feedforward]
        if not vectors:
            return None
        scale = vectors[0]
        for v in vectors[1:]:
            scale = scale * v
        return scale.to(like.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routes = self.routes(x.shape[0])
        for names, index in routes:  # input scaling first (feed-forward vectors)
            scale = self._scale(names, True, x)
            if scale is not None:
                x = x * scale if index is None else x.index_copy(0, index.to(x.device), x.index_select(0, index.to(x.device)) * scale)
        y = self.base_layer(x, *args, **kwargs)
        for names, index in routes:
            scale = self._scale(names, False, y)
            if scale is not None:
                y = y * scale if index is None else y.index_copy(0, index.to(y.device), y.index_select(0, index.to(y.device)) * scale)
        return y

    def merge_blocker(self) -> str | None:
        return quantized_merge_blocker(self.base_layer)

    def _factors(self, name: str) -> tuple[torch.Tensor, bool]:
        """The vector and whether it scales rows of the stored weight (output dim) -- Conv1D stores (in, out)."""
        adapter = self.adapters[name]
        out_dim_first = not is_conv1d(self.base_layer)  # nn.Linear weight is (out, in)
        rows = out_dim_first != adapter.feedforward  # output scaling on (out, in) / input scaling on (in, out)
        return adapter.ia3_l.float(), rows

    def _rescale(self, name: str, invert: bool) -> None:
        l, rows = self._factors(name)
        if invert:
            if bool((l.abs() < 1e-8).any()):
                raise RuntimeError(f"IA3 adapter {name!r} has a zero scale: its merge cannot be undone exactly")
            l = 1.0 / l
        weight = self.base_layer.weight
        factor = l.view(-1, 1) if rows else l.view(1, -1)
        weight.copy_((weight.float() * factor).to(weight.dtype))
        bias = self.base_layer.bias
        if bias is not None and not self.adapters[name].feedforward:
            bias.copy_((bias.float() * l).to(bias.dtype))

    def _merge(self, name: str) -> None:
        self._rescale(name, invert=False)

    def _unmerge(self, name: str) -> None:
        self._rescale(name, invert=True)


def plan_ia3(model: nn.Module, config: IA3Config, modules_to_save: list[str]) -> list[Site]:
    """IA3 sites: the targets, each flagged feed-forward (input scaling) or not (output scaling)."""
    targets = resolve_targets(model, config, is_linear, {k: v[0] for k, v in IA3_DEFAULTS.items()}, "IA3 target_modules", skip=modules_to_save)
    feedforward = config.feedforward_modules
    if feedforward is None and config.target_modules is None:
        feedforward = sorted({p for _, ffn in IA3_DEFAULTS.values() for p in ffn})
    feedforward = feedforward or []
    for pattern in config.feedforward_modules or ():
        if not any(name_matches(pattern, t) for t in targets):
            raise ValueError(f"IA3 feedforward_modules pattern {pattern!r} selects none of the targets {targets}; it must name target modules")
    return [
        Site(n, "ia3", {"feedforward": any(name_matches(p, n) for p in feedforward), "init_ones": config.init_ones})
        for n in targets
    ]


register_method("ia3", IA3Config, plan_ia3)
