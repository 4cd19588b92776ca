"""Trainable tokens (PEFT's ``trainable_token_indices``): train the embedding rows of chosen token ids, nothing else of the embedding.

For new special tokens of a chat template: ``LoRAConfig(trainable_token_indices=[ids])`` (the input embeddings)
or ``{"embed_tokens": [ids], ...}`` (module patterns) adds, beside the LoRA layers, a trainable copy of those
rows (n, dim) that replaces them in the layer's output; the embedding itself stays frozen and adapter files
hold only the n rows. A module whose weight is the same tensor (an LM head tied to the input embeddings)
follows the same rows, as in PEFT: it holds no copy, it reads the embedding adapter's. Merging writes the
rows into the weight (shared by both) and unmerging puts the originals back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..groups.backbone import hf_models
from ..groups.matching import format_names
from ..utils.names import join
from .layer import AdapterLayer
from .registry import Site, register_layer, register_peft_exporter
from .targeting import base_module, candidate_modules, select_modules

__all__ = ["PEFT_TOKENS_KEY", "TokenRows", "TrainableTokensLayer", "check_token_indices", "plan_trainable_tokens", "token_sites"]

PEFT_TOKENS_KEY = ".token_adapter.trainable_tokens_delta"  # PEFT's key suffix of the trained rows


def check_token_indices(owner: str, value: Any) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices`` as a list of ids or ``{module pattern: ids}``; bad values raise naming the field."""
    if value is None:
        return None

    def ids(where: str, items: Any) -> list[int]:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
            raise ValueError(f"{owner}: {where} must be a non-empty list of token ids, got {items!r}")
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise ValueError(f"{owner}: {where} holds {item!r}; token ids are integers >= 0")
            out.append(int(item))
        if len(set(out)) != len(out):
            raise ValueError(f"{owner}: {where} lists token ids more than once: {sorted(i for i in set(out) if out.count(i) > 1)}")
        return out

    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{owner}: trainable_token_indices is an empty dict; give {{module pattern: [token ids]}} or a list of ids")
        return {str(k): ids(f"trainable_token_indices[{k!r}]", v) for k, v in value.items()}
    return ids("trainable_token_indices", value)


class TokenRows(nn.Module):
    """The trained rows ``rows`` (n, dim) of token ids ``indices`` (n,) of one embedding (or of a linear layer's
    output rows); a tied adapter (``spec["tied_to"]``) owns nothing and uses the rows of the adapter it is tied to."""

    def __init__(self, base: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        weight = base.weight
        self.register_buffer("indices", torch.tensor(spec["indices"], dtype=torch.long, device=weight.device), persistent=False)
        self.register_buffer("original", None, persistent=False)  # the base rows while merged
        self.tied = spec.get("tied_to") is not None
        self._source: list[TokenRows] = []  # a plain list: the tied adapter must not own (or save) the rows
        self.rows = None if self.tied else nn.Parameter(weight.detach()[self.indices].clone())

    def values(self) -> torch.Tensor:
        """The trained rows (n, dim), this adapter's or those of the adapter it is tied to."""
        if not self.tied:
            return self.rows
        if not self._source:
            raise RuntimeError(f"trainable tokens tied to {self.spec['tied_to']!r} were never linked to them; place adapters with inject/load_adapter")
        return self._source[0].rows

    def replace(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``y = base(x)`` with the chosen tokens' rows replaced: embedding outputs where x is one of the ids
        (times the layer's ``embed_scale`` if it has one), or linear output features ``indices`` (x·rowsᵀ + bias)."""
        values = self.values()
        if isinstance(base, nn.Embedding):
            lookup = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=x.device)
            lookup[self.indices.to(x.device)] = torch.arange(len(self.indices), device=x.device)
            position = lookup[x]
            rows = values[position.clamp(min=0)]
            scale = getattr(base, "embed_scale", None)
            if scale is not None:
                rows = rows * (scale.to(rows) if isinstance(scale, torch.Tensor) else scale)
            return torch.where((position >= 0).unsqueeze(-1), rows.to(y.dtype), y)
        new = F.linear(x.to(values.dtype), values)
        if base.bias is not None:
            new = new + base.bias[self.indices].to(new.dtype)
        return y.index_copy(-1, self.indices.to(y.device), new.to(y.dtype))


@register_layer
class TrainableTokensLayer(AdapterLayer):
    """An embedding (or LM head) whose rows of chosen token ids come from the active adapters."""

    method = "trainable_tokens"
    merges_tied_weights = True  # merging writes the rows into the shared weight once (tied adapters merge nothing)

    @classmethod
    def make_adapter(cls, base: nn.Module, spec: dict[str, Any]) -> TokenRows:
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise ValueError(f"trainable tokens need an nn.Embedding or nn.Linear (rows = tokens), not a {type(base).__name__}")
        rows = base.weight.shape[0]
        bad = [i for i in spec["indices"] if i >= rows]
        if bad:
            raise ValueError(f"trainable_token_indices {bad} are out of range for a {type(base).__name__} of {rows} tokens; "
                             "resize the token embeddings first (model.resize_token_embeddings) if they are new tokens")
        return TokenRows(base, spec)

    def link(self, model: nn.Module, name: str, adapter_name: str) -> None:
        adapter = self.adapters[adapter_name]
        if adapter.tied:
            source = model.get_submodule(adapter.spec["tied_to"])
            if not isinstance(source, TrainableTokensLayer) or adapter_name not in source.adapters:
                raise ValueError(f"{name!r}: its trainable tokens are tied to {adapter.spec['tied_to']!r}, which has none of adapter {adapter_name!r}")
            adapter._source = [source.adapters[adapter_name]]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        for names, index in self.routes(x.shape[0]):
            self._check_disjoint(names)
            xs = x if index is None else x.index_select(0, index.to(x.device))
            ys = y if index is None else y.index_select(0, index.to(y.device))
            for name in names:
                ys = self.adapters[name].replace(xs, ys, self.base_layer)
            y = ys if index is None else y.index_copy(0, index.to(y.device), ys)
        return y

    def _check_disjoint(self, names: Sequence[str]) -> None:
        seen: set[int] = set()
        for name in names:
            ids = set(self.adapters[name].spec["indices"])
            if seen & ids:
                raise ValueError(f"active adapters {list(names)} train the same token ids {sorted(seen & ids)}; activate one of them")
            seen |= ids

    def _merge(self, name: str) -> None:
        adapter = self.adapters[name]
        if adapter.tied:
            return
        weight = self.base_layer.weight
        adapter.original = weight[adapter.indices].detach().clone()
        weight.index_copy_(0, adapter.indices, adapter.rows.to(weight.dtype))

    def _unmerge(self, name: str) -> None:
        adapter = self.adapters[name]
        if adapter.tied:
            return
        self.base_layer.weight.index_copy_(0, adapter.indices, adapter.original)
        adapter.original = None


def _input_embeddings(model: nn.Module) -> list[str]:
    """Names of the input embeddings of the transformers models in ``model`` (PEFT's fallback: modules named ``embed_tokens``)."""
    names: list[str] = []
    for prefix, hf in hf_models(model):
        get = getattr(hf, "get_input_embeddings", None)
        module = get() if callable(get) else None
        names.extend(join(prefix, n) for n, m in hf.named_modules() if module is not None and m is module)
    return names or [n for n, _ in candidate_modules(model) if n.split(".")[-1] == "embed_tokens"]


def token_sites(model: nn.Module, targets: Mapping[str, list[int]]) -> list[Site]:
    """A site per target module, and a tied site for every other module whose weight is the same tensor."""
    sites = [Site(name, "trainable_tokens", {"indices": list(ids), "tied_to": None}) for name, ids in targets.items()]
    candidates = candidate_modules(model)
    for name, ids in targets.items():
        weight = base_module(model.get_submodule(name)).weight
        for other, module in candidates:
            base = base_module(module)
            if other not in targets and isinstance(base, (nn.Embedding, nn.Linear)) and base.weight is weight:
                sites.append(Site(other, "trainable_tokens", {"indices": list(ids), "tied_to": name}))
    return sites


def plan_trainable_tokens(model: nn.Module, config: Any, modules_to_save: Sequence[str], taken: Sequence[str]) -> list[Site]:
    """Sites of ``config.trainable_token_indices`` (none when it is ``None``); ``taken``: modules other sites wrap."""
    value = config.trainable_token_indices
    if value is None:
        return []
    supported = lambda m: isinstance(m, (nn.Embedding, nn.Linear))
    if isinstance(value, Mapping):
        candidates = candidate_modules(model)
        targets = {n: ids for pattern, ids in value.items()
                   for n in select_modules(candidates, [pattern], supported, "trainable_token_indices", model)}
    else:
        embeddings = _input_embeddings(model)
        if not embeddings:
            raise ValueError(f"trainable_token_indices: {type(model).__name__} has no input embeddings (get_input_embeddings or "
                             "a module named embed_tokens); name the module: trainable_token_indices={'<module>': [ids]}")
        targets = {n: list(value) for n in embeddings}
    sites = token_sites(model, targets)
    clash = [s.module for s in sites if s.module in taken or s.module in modules_to_save]
    if clash:
        raise ValueError(f"trainable_token_indices: {format_names(clash)} also {'are' if len(clash) > 1 else 'is'} a LoRA target or a module "
                         "saved in full; train a few rows of it (trainable_token_indices) or all of it (modules_to_save), not both")
    return sites


def export_tokens_peft(layer: AdapterLayer, adapter: nn.Module, key: str) -> dict[str, torch.Tensor]:
    """PEFT's ``<module>.token_adapter.trainable_tokens_delta`` (the trained rows); tied modules save nothing."""
    return {} if adapter.tied else {key + PEFT_TOKENS_KEY: adapter.rows}


register_peft_exporter("trainable_tokens", export_tokens_peft)
