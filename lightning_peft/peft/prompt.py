"""Prompt methods for ``transformers`` models: prompt tuning, P-tuning (v1) here; prefix tuning and P-tuning v2 in ``prefix.py``.

**Where they attach.** A prompt method has to change how the model is *called* -- a longer input,
a longer attention mask, shifted positions, a pre-filled key/value cache -- which no single layer
inside the model sees. So the wrapper (:class:`PromptLayer`, an ordinary :class:`AdapterLayer`) goes
around the ``transformers`` base model itself (``model.transformer`` of a ``GPT2LMHeadModel``,
``model.bert`` of a ``BertForSequenceClassification``, ``self.backbone`` of your LightningModule)
and rewrites the keyword arguments of its ``forward``. Your module calls ``self.backbone(input_ids=...,
attention_mask=...)`` exactly as before; the ``*For*`` model around a wrapped base model (LM head,
classifier, ``generate()``) keeps working too, because the wrapper hands back outputs with the
shapes the caller expects. No hooks and no changes to your code; switching, disabling, deleting,
save/load and adapter-only checkpoints are the shared ``AdapterLayer`` machinery. The wrapper is
``transparent``: other methods (LoRA, ...) still find and wrap the modules inside it.

**What the wrapper does**, with ``k`` virtual tokens (the rule is the same for every method):

- Virtual tokens come first and take positions ``0..k-1``; real token ``i`` moves to position
  ``k + i``. Every real token attends to all virtual tokens (the attention mask gets ``k`` ones in
  front); padding stays masked. Position ids you pass (``generate()`` passes them) are shifted by
  ``k``; missing ones are derived by the model as usual.
- Input prompts (prompt tuning, P-tuning): the ``k`` prompt vectors are prepended to the input
  embeddings (``token_type_ids`` get ``k`` zeros in front), and the ``k`` virtual positions are
  removed again from ``last_hidden_state`` and ``hidden_states``, so outputs, LM logits and losses
  line up with *your* tokens, mask and labels. ``pooler_output`` (BERT's tanh head over position 0)
  and ``attentions`` are left as computed over all ``k + L`` positions.
- Key/value prefixes (prefix tuning, P-tuning v2): every attention layer gets ``k`` trainable keys
  and values, written into a ``transformers.DynamicCache`` (the installed ``Cache`` API) before the
  model runs, so the real queries attend to them first. Nothing is added to the sequence, so
  nothing is removed from the outputs.
- A call that brings a non-empty cache (every decoding step of ``generate()``) continues a sequence
  that already holds the virtual tokens: only the mask and positions are shifted.

**Limits.** ``transformers`` models only (text models taking ``inputs_embeds``, and for prefixes
``past_key_values``); one prompt adapter active at a time; no mixed-adapter batches
(``adapter_batch``); a 2-D attention mask; prefixes not under gradient checkpointing (``transformers``
drops the cache inside checkpointed layers) nor on sliding-window caches; a cache passed in from
outside must come from this wrapper (a continuation). Prompts cannot be merged into weights. The
wrapped model cannot be the root module you inject into (put it in a module, e.g. use the
``*ForCausalLM`` class).

**Training vs. inference form.** P-tuning (LSTM/MLP prompt encoder) and prefix tuning with its MLP
reparameterisation train an encoder that produces the prompts. Lightning checkpoints keep that
encoder (resuming needs it, peft #2256); :func:`~lightning_peft.save_adapter` writes the final
prompts alone (the inference form), which load back as a plain prompt adapter with identical outputs.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..groups.matching import format_names
from ..utils.calls import forward_signature
from .config import MethodConfig, check_choice, check_field, check_probability
from .layer import AdapterLayer
from .registry import Site, register_layer, register_method
from .targeting import base_module, hf_models, resolve_targets

__all__ = [
    "ENCODERS",
    "PTuningConfig",
    "PromptEncoder",
    "PromptLayer",
    "PromptTuningConfig",
    "prompt_target",
]

ENCODERS = ("none", "mlp", "lstm", "prefix_mlp")
PROMPT_INITS = ("random", "vocab", "text")


def _transformers():
    return sys.modules.get("transformers")


def _is_transformers_model(module: nn.Module) -> bool:
    t = _transformers()
    return t is not None and isinstance(module, t.PreTrainedModel)


@dataclass
class PromptMethodConfig(MethodConfig):
    """Shared by the prompt methods: the number of virtual tokens, and which ``transformers`` model to wrap.

    ``target_modules=None`` wraps the base model (``model.base_model``) of the one ``transformers``
    model inside yours; a pattern names another module holding one.
    """

    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self, "num_virtual_tokens", lambda k: k >= 1, "it must be an integer >= 1")


@dataclass
class PromptTuningConfig(PromptMethodConfig):
    """Prompt tuning (Lester et al. 2021): ``k`` trainable embeddings prepended to the input embeddings.

    Args:
        num_virtual_tokens: ``k``.
        init: ``"random"`` (normal, with the spread of the model's word embeddings), ``"vocab"``
            (embeddings of ``k`` vocabulary tokens drawn at random) or ``"text"`` (embeddings of the
            tokens of ``init_text``, e.g. the class names, repeated or cut to ``k``).
        init_text: the text for ``init="text"``.
        tokenizer: name or folder of the tokenizer for ``init_text`` (default: the model's own,
            ``config._name_or_path``).

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from lightning_peft import PromptTuningConfig, inject
        >>> gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
        >>> gpt = inject(gpt, PromptTuningConfig(num_virtual_tokens=5, modules_to_save=None))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> gpt(ids).logits.shape  # the 5 virtual positions are not in the outputs
        torch.Size([1, 3, 50])
        >>> gpt.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False).shape
        torch.Size([1, 7])
    """

    method = "prompt_tuning"

    init: str = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "init", PROMPT_INITS)
        if (self.init == "text") != bool(self.init_text):
            raise ValueError("PromptTuningConfig: init='text' needs init_text (and init_text needs init='text')")


@dataclass
class PTuningConfig(PromptMethodConfig):
    """P-tuning (Liu et al. 2021, "GPT understands, too"): input prompts produced by a prompt encoder.

    Args:
        num_virtual_tokens: ``k``.
        encoder: ``"lstm"`` (bidirectional 2-layer LSTM + MLP, as the paper) or ``"mlp"`` (3 layers).
        encoder_hidden: hidden width of the encoder (per LSTM direction); ``None`` = the model's embedding width.
        dropout: dropout inside the LSTM and on the prompts.
    """

    method = "p_tuning"

    encoder: str = "lstm"
    encoder_hidden: int | None = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "encoder", ("lstm", "mlp"))
        check_field(self, "encoder_hidden", lambda h: h is None or h >= 1, "it must be an integer >= 1, or None for the embedding width")
        check_probability(self, "dropout")


# --- the adapter: prompts, or an encoder that produces them ------------------------------------


class PromptEncoder(nn.Module):
    """One prompt adapter: ``forward()`` returns the ``k`` virtual tokens, ``(k, out_dim)``.

    ``spec["kind"]`` is ``"input"`` (each row an input embedding) or ``"kv"`` (each row the keys and
    values of all layers, ``(layers, 2, heads, head_dim)`` flattened). ``spec["encoder"]``: ``"none"``
    (the rows are the parameter ``prompt``), ``"mlp"`` / ``"lstm"`` (P-tuning) or ``"prefix_mlp"``
    (prefix tuning's reparameterisation): an ``embedding`` ``(k, embed_dim)`` goes through ``encoder``.
    """

    def __init__(self, spec: dict[str, Any], word_embeddings: torch.Tensor | None, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.kind: str = spec["kind"]
        self.encoder_kind: str = spec["encoder"]
        self.tokens = int(spec["tokens"])
        self.out_dim = int(spec["out_dim"])
        if self.encoder_kind not in ENCODERS:
            raise ValueError(f"unknown prompt encoder {self.encoder_kind!r}; expected one of {list(ENCODERS)}")
        factory = {"device": device, "dtype": dtype}
        width = self.out_dim if self.encoder_kind == "none" else int(spec["embed_dim"])
        init = torch.empty(self.tokens, width, **factory)
        self._initialise(init, word_embeddings)
        if self.encoder_kind == "none":
            self.prompt = nn.Parameter(init)
        else:
            self.embedding = nn.Parameter(init)
            hidden = int(spec["hidden"])
            if self.encoder_kind == "lstm":
                self.lstm = nn.LSTM(width, hidden, num_layers=2, dropout=spec.get("dropout", 0.0), bidirectional=True, batch_first=True, **factory)
                self.encoder = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(), nn.Linear(2 * hidden, self.out_dim, **factory))
            elif self.encoder_kind == "mlp":
                self.encoder = nn.Sequential(
                    nn.Linear(width, hidden, **factory), nn.ReLU(), nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                    nn.Linear(hidden, self.out_dim, **factory),
                )
            else:
                self.encoder = nn.Sequential(nn.Linear(width, hidden, **factory), nn.Tanh(), nn.Linear(hidden, self.out_dim, **factory))
        self.dropout = nn.Dropout(spec["dropout"]) if spec.get("dropout", 0.0) > 0 else nn.Identity()

    def _initialise(self, out: torch.Tensor, word_embeddings: torch.Tensor | None) -> None:
        init = self.spec.get("init", "normal")
        with torch.no_grad():
            if init in ("vocab", "text"):
                if word_embeddings is None or word_embeddings.shape[1] != out.shape[1]:
                    raise ValueError(f"prompt init {init!r} needs the model's word embeddings of width {out.shape[1]}")
                if init == "vocab":
                    ids = torch.randint(0, word_embeddings.shape[0], (self.tokens,))
                else:
                    base = list(self.spec["init_token_ids"])
                    ids = torch.tensor((base * (self.tokens // len(base) + 1))[: self.tokens])
                out.copy_(word_embeddings.detach()[ids.to(word_embeddings.device)].to(out))
            else:
                out.normal_(0.0, float(self.spec.get("std", 1.0)))

    def forward(self) -> torch.Tensor:
        if self.encoder_kind == "none":
            x = self.prompt
        else:
            x = self.embedding
            if self.encoder_kind == "lstm":
                x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
            x = self.encoder(x)
        return self.dropout(x)

    def inference_form(self) -> PromptEncoder:
        """The final prompts as a plain ``prompt`` adapter (encoder dropped), computed in eval mode."""
        if self.encoder_kind == "none":
            return self
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                value = self()
        finally:
            self.train(was)
        spec = {k: v for k, v in self.spec.items() if k not in ("embed_dim", "hidden", "init_token_ids")}
        spec.update(encoder="none", init="normal", std=1.0)
        final = PromptEncoder(spec, None, value.device, value.dtype)
        with torch.no_grad():
            final.prompt.copy_(value)
        return final.train(was)


# --- the wrapper around the transformers model ----------------------------------------------------

def _bind(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones bound to ``forward``'s signature, ``**kwargs`` flattened)."""
    sig = forward_signature(module)
    bound = sig.bind(*args, **kwargs).arguments
    out: dict[str, Any] = {}
    for name, value in bound.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"prompt methods cannot pass extra positional arguments to {type(module).__name__}.forward")
        else:
            out[name] = value
    return out


def _compute_dtype(base: nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(base.parameters()).dtype


def _position_limit(base: nn.Module) -> int | None:
    """Number of learned absolute positions (BERT-style ``position_embeddings``, GPT-2 ``wpe``), else ``None``."""
    embeddings = getattr(base, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None) if embeddings is not None else getattr(base, "wpe", None)
    return table.num_embeddings if isinstance(table, nn.Embedding) else None


def _strip(output: Any, k: int) -> Any:
    """Drop the first ``k`` (virtual) positions of the sequence outputs."""
    if isinstance(output, dict):  # transformers ModelOutput
        if output.get("last_hidden_state") is not None:
            output["last_hidden_state"] = output["last_hidden_state"][:, k:].contiguous()
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(h[:, k:].contiguous() for h in output["hidden_states"])
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0][:, k:].contiguous(), *output[1:])
    return output


def _use_cache(base: nn.Module, kw: dict[str, Any]) -> bool:
    """Whether the call asks the model for a key/value cache (``use_cache``, else the model config's default)."""
    flag = kw.get("use_cache")
    return bool(getattr(base.config, "use_cache", False) if flag is None else flag)


def _drop_cache(output: Any, cache: Any) -> Any:
    """``output`` without ``cache`` (a ``ModelOutput``'s ``past_key_values``, or that element of a tuple output)."""
    if isinstance(output, dict):
        if output.get("past_key_values") is cache:
            output["past_key_values"] = None
        return output
    if isinstance(output, tuple):
        return tuple(o for o in output if o is not cache)
    return output


@register_layer
class PromptLayer(AdapterLayer):
    """A ``transformers`` base model whose calls get the active prompt adapter's virtual tokens (see the module doc)."""

    method = "prompt"
    transparent = True

    def merge_blocker(self) -> str | None:
        return "prompts and key/value prefixes are extra inputs of the model, not a change of its weights; nothing can be merged"

    def _merge(self, name: str) -> None:
        raise RuntimeError(f"adapter {name!r}: {self.merge_blocker()}")

    @classmethod
    def make_adapter(cls, base: nn.Module, spec: dict[str, Any]) -> PromptEncoder:
        if not _is_transformers_model(base):
            raise ValueError(f"prompt adapters wrap a transformers model, not {type(base).__name__}")
        weight = base.get_input_embeddings().weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        return PromptEncoder(spec, weight, weight.device, dtype)

    def _active(self) -> PromptEncoder | None:
        if self.disabled:
            return None
        if self.routing is not None:
            raise RuntimeError(
                "prompt methods cannot serve mixed-adapter batches (adapter_batch): the adapters' virtual tokens differ per "
                "sample. Run one batch per adapter (set_adapter), or use LoRA/IA3/BitFit/bottleneck adapters for mixed batches."
            )
        names = [n for n in self.active if n in self.adapters]
        if len(names) > 1:
            raise RuntimeError(f"only one prompt adapter can be active at a time, not {names}; set_adapter(model, one_name)")
        return self.adapters[names[0]] if names else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter = self._active()
        if adapter is None:
            return self.base_layer(*args, **kwargs)
        kw = _bind(self.base_layer, args, kwargs)
        wants_cache = kw.get("past_key_values") is not None or _use_cache(self.base_layer, kw)
        inputs, strip = self._prepare(adapter, kw)
        output = self.base_layer(**inputs)
        if not wants_cache and inputs.get("past_key_values") is not None:
            # the prefix cache is ours, not the caller's: hand back none, or generate(use_cache=False) feeds it back
            output = _drop_cache(output, inputs["past_key_values"])
        return _strip(output, strip) if strip else output

    def _prepare(self, adapter: PromptEncoder, kw: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The base model's arguments with the virtual tokens in, and how many leading positions to strip after."""
        base, k = self.base_layer, adapter.tokens
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if (ids is None) == (embeds is None):
            raise ValueError("prompt methods need exactly one of input_ids or inputs_embeds")
        batch, length = (ids.shape[0], ids.shape[1]) if ids is not None else embeds.shape[:2]
        device = (ids if ids is not None else embeds).device
        cache = kw.get("past_key_values")
        t = _transformers()
        if cache is not None and not isinstance(cache, t.Cache):
            raise TypeError(f"past_key_values must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"prompt methods need a 2-D attention mask (batch, tokens), got shape {tuple(mask.shape)}")
        limit = _position_limit(base)
        if limit is not None and (past if past > 0 else k) + length > limit:
            raise ValueError(
                f"{length} tokens + {k} virtual tokens exceed the {limit} positions of {type(base).__name__}; shorten the inputs "
                "(e.g. data.max_length) or use fewer virtual tokens"
            )
        ones = lambda n: torch.ones(batch, n, dtype=mask.dtype if mask is not None else torch.long, device=device)
        position_ids = kw.get("position_ids")
        if past > 0:  # a continuation: the cache already holds the virtual tokens
            if mask is not None:
                kw["attention_mask"] = torch.cat([ones(k), mask], dim=1)
            if position_ids is not None:
                kw["position_ids"] = position_ids + k
            return kw, 0
        kw["attention_mask"] = torch.cat([ones(k), mask if mask is not None else ones(length)], dim=1)
        if adapter.kind == "input":
            if embeds is None:
                embeds = base.get_input_embeddings()(ids)
            prompts = adapter().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            kw["input_ids"], kw["inputs_embeds"] = None, torch.cat([prompts, embeds], dim=1)
            if kw.get("token_type_ids") is not None:
                kw["token_type_ids"] = torch.cat([torch.zeros_like(kw["token_type_ids"][:, :1]).expand(-1, k), kw["token_type_ids"]], dim=1)
            if position_ids is not None:
                virtual = torch.arange(k, device=position_ids.device, dtype=position_ids.dtype).expand(position_ids.shape[0], k)
                kw["position_ids"] = torch.cat([virtual, position_ids + k], dim=1)
            return kw, k
        kw["past_key_values"] = self._prefix_cache(adapter, cache, batch, device)
        if position_ids is not None:
            kw["position_ids"] = position_ids + k
        return kw, 0

    def _prefix_cache(self, adapter: PromptEncoder, cache: Any, batch: int, device: torch.device) -> Any:
        """``cache`` (or a new ``DynamicCache``) holding the adapter's keys and values in every layer."""
        base = self.base_layer
        if self.training and any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
            raise RuntimeError(
                "prefix tuning / P-tuning v2 put their keys and values in the key/value cache, which transformers drops inside "
                "gradient-checkpointed layers: the prefixes would get no gradient. Turn gradient checkpointing off, or use "
                "prompt tuning / P-tuning (input prompts)."
            )
        if cache is None:
            cache = _transformers().DynamicCache(config=base.config)
        spec = adapter.spec
        layers, heads, head_dim, k = int(spec["layers"]), int(spec["kv_heads"]), int(spec["head_dim"]), adapter.tokens
        prefix = adapter().to(device=device, dtype=_compute_dtype(base, device))
        prefix = prefix.view(k, layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)  # (layers, 2, heads, k, head_dim)
        for i in range(layers):
            cache.update(prefix[i, 0].unsqueeze(0).expand(batch, -1, -1, -1), prefix[i, 1].unsqueeze(0).expand(batch, -1, -1, -1), i)
        if any(getattr(cache, "is_sliding", [])):
            raise ValueError(f"{type(base).__name__} uses sliding-window attention layers, whose cache would drop the prefix; use prompt tuning")
        return cache


# --- planning --------------------------------------------------------------------------------------


def _wrapper_name(model: nn.Module, name: str) -> str:
    """The name of the wrapper that holds the module ``name`` as its ``base_layer``, if any (else ``name``)."""
    while name == "base_layer" or name.endswith(".base_layer"):
        parent = name[: -len("base_layer")].rstrip(".")
        if not isinstance(model.get_submodule(parent) if parent else model, AdapterLayer):
            break
        name = parent
    return name


def prompt_target(model: nn.Module, config: PromptMethodConfig, modules_to_save: list[str], needs: str) -> tuple[str, nn.Module]:
    """The ``transformers`` base model to wrap (name, module), checked to accept ``needs`` (a ``forward`` argument)."""
    what = f"{type(config).__name__} target_modules"

    def base_models(candidates: list[tuple[str, nn.Module]]) -> list[str]:
        found = []
        for name, hf in hf_models(model):
            inner = hf.base_model
            if inner is not hf:
                name = f"{name}.{hf.base_model_prefix}" if name else hf.base_model_prefix
            found.append(_wrapper_name(model, name))
        if not found:
            raise ValueError(f"{type(config).__name__}: prompt methods need a transformers model inside {type(model).__name__}; found none")
        return list(dict.fromkeys(found))

    names = resolve_targets(model, config, _is_transformers_model, base_models, what, skip=modules_to_save)
    if len(names) != 1:
        raise ValueError(f"{what}: found several transformers models ({format_names(names)}); name the one to prompt with target_modules=[...]")
    name = names[0]
    if not name:
        raise ValueError(
            f"{type(config).__name__}: the transformers model is the module you inject into, and a prompt method has to wrap it. "
            f"Inject into a module that holds it (your LightningModule, or the *For* class such as {type(model).__name__.replace('Model', 'ForCausalLM')})."
        )
    base = base_module(model.get_submodule(name))
    if needs not in forward_signature(base).parameters:
        raise ValueError(
            f"{type(config).__name__}: {type(base).__name__}.forward takes no {needs!r}, which this method needs "
            f"({'input prompts' if needs == 'inputs_embeds' else 'key/value prefixes'}); prompt methods cover text transformers models"
        )
    if getattr(base.config, "is_encoder_decoder", False):
        raise ValueError(f"{type(config).__name__}: encoder-decoder models ({type(base).__name__}) are not supported by the prompt methods yet")
    return name, base


def _embedding_weight(base: nn.Module) -> torch.Tensor:
    return base.get_input_embeddings().weight


def _text_token_ids(base: nn.Module, config: PromptTuningConfig) -> list[int]:
    from ..models.pretrained import load_tokenizer

    source = config.tokenizer or getattr(base.config, "_name_or_path", None)
    if not source:
        raise ValueError("PromptTuningConfig: init='text' needs a tokenizer; pass tokenizer=<name or folder>")
    ids = load_tokenizer(source)(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"PromptTuningConfig: init_text {config.init_text!r} gives no tokens")
    return [int(i) for i in ids]


def plan_prompt_tuning(model: nn.Module, config: PromptTuningConfig, modules_to_save: list[str]) -> list[Site]:
    name, base = prompt_target(model, config, modules_to_save, "inputs_embeds")
    weight = _embedding_weight(base)
    spec: dict[str, Any] = {"kind": "input", "encoder": "none", "tokens": config.num_virtual_tokens, "out_dim": int(weight.shape[1]), "init": "normal"}
    if config.init == "random":
        spec["std"] = float(weight.detach().float().std())
    elif config.init == "vocab":
        spec["init"] = "vocab"
    else:
        spec.update(init="text", init_token_ids=_text_token_ids(base, config))
    return [Site(name, "prompt", spec)]


def plan_p_tuning(model: nn.Module, config: PTuningConfig, modules_to_save: list[str]) -> list[Site]:
    name, base = prompt_target(model, config, modules_to_save, "inputs_embeds")
    width = int(_embedding_weight(base).shape[1])
    spec = {
        "kind": "input", "encoder": config.encoder, "tokens": config.num_virtual_tokens, "out_dim": width, "embed_dim": width,
        "hidden": config.encoder_hidden or width, "dropout": config.dropout, "init": "normal", "std": 1.0,
    }
    return [Site(name, "prompt", spec)]


register_method("prompt_tuning", PromptTuningConfig, plan_prompt_tuning)
register_method("p_tuning", PTuningConfig, plan_p_tuning)
