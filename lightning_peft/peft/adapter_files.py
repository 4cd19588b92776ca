"""Adapter files: our own format, Lightning adapter checkpoints, and Hugging Face PEFT's layout.

Our format is a folder with ``adapter.safetensors`` (the adapter's tensors) and ``adapter.json``
(method config, the sites it wraps with their specs, and the SHA-256 of the tensor file, written
last so an interrupted save is detected). Loading replays the sites, checks every key and shape
against what the base model builds, and leaves the model untouched when anything disagrees.

PEFT's layout is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``lora_embedding_A`` for embeddings,
``<module>.base_layer.bias`` for trained biases, plain keys for ``modules_to_save``), relative to
the ``transformers`` model inside yours -- what ``PeftModel.from_pretrained`` reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.atomic_files import atomic_write_bytes, atomic_write_json
from ..groups.matching import format_names
from .config import MethodConfig
from .layer import adapter_layers
from .lora import LoRAConfig, lora_kind
from .functional import (
    adapter_sites,
    adapter_state_dict,
    apply_sites,
    delete_adapter,
    install_input_grad_hooks,
    list_adapters,
    set_adapter,
    unmerged,
)
from .registry import Site, config_from_dict, method_for
from .targeting import base_module, hf_models

__all__ = ["adapter_config", "export_peft", "import_peft", "load_adapter", "save_adapter"]

log = logging.getLogger(__name__)

FORMAT, VERSION = "lightning_peft.adapter", 1
ADAPTER_JSON, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
EXTRA_WEIGHTS = "lightning_peft_extra.safetensors"  # tensors outside the transformers model (PEFT ignores the file)
PEFT_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, adapter_name: str = "default") -> MethodConfig:
    """The config an adapter was created with."""
    for _, layer in adapter_layers(model):
        if adapter_name in layer.configs:
            return layer.configs[adapter_name]
    raise ValueError(f"No adapter named {adapter_name!r}; adapters: {format_names(list_adapters(model))}")


def adapter_metadata(model: nn.Module, adapter_name: str, inference: bool = False) -> dict[str, Any]:
    """What rebuilds the adapter on a fresh base model: its config and sites (JSON-able).

    ``inference=True`` describes the adapters' inference forms (adapter files); the default, the
    training forms (Lightning checkpoints, which must resume training).
    """
    return {
        "format": FORMAT, "version": VERSION, "adapter_name": adapter_name,
        "config": adapter_config(model, adapter_name).to_dict(),
        "sites": [asdict(s) for s in adapter_sites(model, adapter_name, inference)],
    }


def _safetensors():
    import safetensors.torch

    return safetensors.torch


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write the adapter alone (``adapter.safetensors`` + ``adapter.json``) into folder ``path``; returns it.

    Adapters with a training-only part write their inference form: prompt/prefix encoders (MLP, LSTM
    reparameterisations) are replaced by the final prompts they produce. Lightning checkpoints keep
    the encoders, so training resumes from them.
    """
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name, inference=True).items()}
    blob = _safetensors().save(state)
    meta = adapter_metadata(model, adapter_name, inference=True)
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_bytes(path / ADAPTER_WEIGHTS, blob)
    atomic_write_json(path / ADAPTER_JSON, meta)  # last: names the exact tensor file it belongs to
    return path


def _install(model: nn.Module, name: str, config: MethodConfig, sites: list[Site], tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Add adapter ``name`` at ``sites`` and fill it from ``tensors`` (keys as in adapter_state_dict), all or nothing."""
    if name in list_adapters(model):
        raise ValueError(f"Adapter {name!r} already exists on {type(model).__name__}; load it under another adapter_name")
    method = method_for(config)
    if method.prepare is not None:  # e.g. QLoRA: quantize the fresh base the same way
        method.prepare(model, config, [s.module for s in sites if s.layer == "modules_to_save"])
    apply_sites(model, sites, name, config)
    try:
        expected = adapter_state_dict(model, name)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
        if missing or unexpected or shapes:
            problems = []
            if missing:
                problems.append(f"missing from the file: {format_names(missing, 10)}")
            if unexpected:
                problems.append(f"not in the model: {format_names(unexpected, 10)}")
            if shapes:
                problems.append("shape mismatch: " + "; ".join(shapes[:10]))
            raise ValueError(f"Adapter {source} does not fit {type(model).__name__} (a different base model?): " + "; ".join(problems))
        with torch.no_grad():
            for key, value in expected.items():
                value.copy_(tensors[key])
    except BaseException:
        delete_adapter(model, name)
        raise
    model.requires_grad_(False)  # as inject: only the adapter trains (and may go on training)
    set_adapter(model, name)
    install_input_grad_hooks(model)


def _check_format(meta: Mapping[str, Any], source: str) -> None:
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{source} is not a lightning_peft adapter of format {FORMAT} v{VERSION} (got {meta.get('format')!r} v{meta.get('version')!r})")


def _load_ours(model: nn.Module, folder: Path, adapter_name: str | None) -> str:
    meta = json.loads((folder / ADAPTER_JSON).read_text())
    _check_format(meta, str(folder / ADAPTER_JSON))
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing (adapter.json is there): an incomplete copy of the adapter folder?")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise ValueError(f"{weights} does not match {ADAPTER_JSON} (checksum differs): the folder holds parts of two saves or a damaged file")
    name = adapter_name or meta["adapter_name"]
    sites = [Site(**s) for s in meta["sites"]]
    _install(model, name, config_from_dict(meta["config"]), sites, _safetensors().load(blob), str(folder))
    return name


def _load_checkpoint(model: nn.Module, file: Path, adapter_name: str | None) -> str:
    checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    entries = [v for v in (checkpoint.get("callbacks") or {}).values() if isinstance(v, Mapping) and v.get("format") == FORMAT]
    if not entries:
        raise ValueError(f"{file} holds no lightning_peft adapter (it was not saved with the PEFT callback)")
    if len(entries) > 1 and adapter_name is None:
        raise ValueError(f"{file} holds adapters {[e['adapter_name'] for e in entries]}; pick one with adapter_name=")
    meta = next((e for e in entries if adapter_name in (None, e["adapter_name"])), entries[0])
    saved = meta["adapter_name"]
    state = checkpoint["state_dict"]
    tensors: dict[str, torch.Tensor] = {}
    for site in meta["sites"]:
        prefix = f"{site['module']}.adapters.{saved}."
        tensors.update({f"{site['module']}.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)})
    name = adapter_name or saved
    _install(model, name, config_from_dict(meta["config"]), [Site(**s) for s in meta["sites"]], tensors, str(file))
    return name


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> str:
    """Add a saved adapter to ``model`` and make it active; returns its name.

    ``path`` is a folder written by :func:`save_adapter`, a folder in PEFT's layout (see
    :func:`import_peft`), or a Lightning checkpoint saved with the :class:`~lightning_peft.PEFT`
    callback (adapter-only or full). A file that does not fit the model (missing modules, other
    shapes, missing or extra tensors) is an error and the model is left as it was.
    """
    path = Path(path)
    if path.is_file():
        return _load_checkpoint(model, path, adapter_name)
    if (path / ADAPTER_JSON).exists():
        return _load_ours(model, path, adapter_name)
    if (path / PEFT_CONFIG).exists():
        return import_peft(model, path, adapter_name or "default")
    raise FileNotFoundError(
        f"No adapter at {path}: expected a folder with {ADAPTER_JSON} (lightning_peft), {PEFT_CONFIG} (Hugging Face PEFT), "
        "or a Lightning checkpoint file"
    )


# --- Hugging Face PEFT layout ----------------------------------------------------------------------


def _peft_root(model: nn.Module, root: str | None) -> str:
    if root is not None:
        model.get_submodule(root)  # raises on a wrong name
        return root
    found = hf_models(model)
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} holds several transformers models ({[n for n, _ in found]}); pass root=<module name>")
    return found[0][0] if found else ""


def _relative(name: str, root: str) -> str | None:
    if not root:
        return name
    return name[len(root) + 1 :] if name.startswith(root + ".") else None


def export_peft(model: nn.Module, path: str | Path, adapter_name: str = "default", root: str | None = None) -> Path:
    """Write a LoRA adapter in PEFT's layout, loadable with ``PeftModel.from_pretrained(base, path)``.

    ``root`` names the base model PEFT will wrap (default: the ``transformers`` model inside
    ``model``); keys are relative to it. Tensors outside it (say a head of your LightningModule) go
    to ``lightning_peft_extra.safetensors``, which :func:`import_peft` reads and PEFT ignores (a
    warning lists them).
    """
    config = adapter_config(model, adapter_name)
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"PEFT export covers LoRA adapters; {adapter_name!r} is {config.method} (use save_adapter)")
    root = _peft_root(model, root)
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    saved: list[str] = []
    extra_saved: list[str] = []  # modules to save outside root: named in the extra file's metadata
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fan_in_fan_out = False
    with unmerged(model):
        for name, layer in adapter_layers(model):
            if adapter_name not in layer.adapters:
                continue
            adapter = layer.adapters[adapter_name]
            rel = _relative(name, root)
            out = tensors if rel is not None else extra
            key = PEFT_PREFIX + (rel if rel is not None else name)
            base = layer.base_layer
            if layer.method == "lora":
                suffix = ("lora_embedding_A", "lora_embedding_B") if adapter.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
                out[f"{key}.{suffix[0]}"], out[f"{key}.{suffix[1]}"] = adapter.lora_A, adapter.lora_B
                if adapter.bias_delta is not None:
                    out[f"{key}.base_layer.bias"] = base.bias + adapter.bias_delta.to(base.bias.dtype)
                if rel is not None:
                    targets.append(rel)
                    fan_in_fan_out |= adapter.kind == "conv1d"
                    if adapter.spec["r"] != config.r:
                        rank_pattern[re.escape(rel)] = adapter.spec["r"]
                    if adapter.spec["alpha"] != config.alpha:
                        alpha_pattern[re.escape(rel)] = adapter.spec["alpha"]
            elif layer.method == "bitfit":
                out[f"{key}.bias"] = base.bias + adapter.bias_delta.to(base.bias.dtype)
            elif layer.method == "modules_to_save":
                out.update({f"{key}.{k}": v for k, v in adapter.state_dict().items()})
                (saved if rel is not None else extra_saved).append(rel if rel is not None else name)
            else:
                raise ValueError(f"PEFT export cannot write {layer.method} layers (at {name!r})")
        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
        extra = {k: v.detach().contiguous().cpu().clone() for k, v in extra.items()}
    if not targets:
        raise ValueError(f"Adapter {adapter_name!r} has no LoRA layers inside {root or 'the model'!r}; nothing PEFT could load")
    hf = model.get_submodule(root) if root else model
    peft_config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(hf, "config", None), "_name_or_path", None) or None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": config.bias, "modules_to_save": saved or None, "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "revision": None, "exclude_modules": None,
    }
    st = _safetensors()
    atomic_write_bytes(path / PEFT_WEIGHTS, st.save(tensors))
    if extra:
        atomic_write_bytes(path / EXTRA_WEIGHTS, st.save(extra, metadata={"modules_to_save": json.dumps(extra_saved)}))
        log.warning(
            "export_peft: %d tensors lie outside %r and went to %s; PEFT will not load them (import_peft does): %s",
            len(extra), root, EXTRA_WEIGHTS, format_names(sorted(extra), 10),
        )
    atomic_write_json(path / PEFT_CONFIG, peft_config)
    return path


_UNSUPPORTED = ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices", "layer_replication", "alora_invocation_tokens")


def _pattern(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def import_peft(model: nn.Module, path: str | Path, adapter_name: str = "default", root: str | None = None) -> str:
    """Add a LoRA adapter saved by Hugging Face PEFT (or :func:`export_peft`) to ``model``; returns its name.

    The modules to wrap come from the tensor file's keys, ranks from the tensor shapes and scaling
    from ``adapter_config.json``. Options PEFT has and we do not (DoRA, LoRA bias, target
    parameters, trainable tokens) are an error, never ignored.
    """
    path = Path(path)
    cfg = json.loads((path / PEFT_CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path / PEFT_CONFIG}: peft_type {cfg.get('peft_type')!r}; import_peft reads LORA adapters")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise ValueError(f"{path / PEFT_CONFIG}: {key}={cfg[key]!r} is not supported by lightning_peft's LoRA")
    if (path / PEFT_WEIGHTS).exists():
        file_tensors = _safetensors().load_file(str(path / PEFT_WEIGHTS))
    elif (path / PEFT_WEIGHTS_BIN).exists():
        file_tensors = torch.load(path / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has {PEFT_CONFIG} but neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")
    root = _peft_root(model, root)
    absolute = lambda rel: f"{root}.{rel}" if root else rel
    tensors: dict[str, torch.Tensor] = {}
    for key, value in file_tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{path / PEFT_WEIGHTS}: key {key!r} does not start with {PEFT_PREFIX!r}; not a LoRA adapter file")
        tensors[absolute(key[len(PEFT_PREFIX) :])] = value
    extra_saved: list[str] = []
    if (path / EXTRA_WEIGHTS).exists():
        from safetensors import safe_open

        with safe_open(str(path / EXTRA_WEIGHTS), "pt") as f:
            extra_saved = json.loads((f.metadata() or {}).get("modules_to_save", "[]"))
        tensors.update({k[len(PEFT_PREFIX) :]: v for k, v in _safetensors().load_file(str(path / EXTRA_WEIGHTS)).items()})

    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B", ".base_layer.bias": "bias"}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for suffix, part in suffixes.items():
            if key.endswith(suffix):
                lora.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            rest[key] = value
    saved_patterns = cfg.get("modules_to_save") or []
    module_names = {n for n, _ in model.named_modules()}
    saved_modules: dict[str, None] = {}
    bitfit: list[str] = []
    for key in rest:
        owner = next((m for m in _prefixes(key) if m in extra_saved or (
            m in module_names and any(re.match(rf"(^|.*\.){p}$", _relative(m, root) or m) for p in saved_patterns))), None)
        if owner is not None:
            saved_modules[owner] = None
        elif key.endswith(".bias") and cfg.get("bias") == "all" and key[: -len(".bias")] in module_names:
            bitfit.append(key[: -len(".bias")])
        else:
            raise ValueError(f"{path}: tensor {key!r} is neither a LoRA weight, a module to save nor a trained bias")

    sites: list[Site] = []
    ours: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for module, parts in lora.items():
            if "A" not in parts or "B" not in parts:
                raise ValueError(f"{path}: LoRA weights of {module!r} are incomplete (have {sorted(parts)})")
            if module not in module_names:
                raise ValueError(f"{path}: the adapter wraps {module!r}, which {type(model).__name__} does not have (a different base model?)")
            base = base_module(model.get_submodule(module))
            kind = lora_kind(base)
            if kind is None:
                raise ValueError(f"{path}: {module!r} is a {type(base).__name__}, which LoRA cannot wrap")
            rel = _relative(module, root) or module
            spec = {
                "kind": kind, "r": int(parts["A"].shape[0]), "alpha": float(_pattern(cfg.get("alpha_pattern") or {}, rel, cfg.get("lora_alpha", 8))),
                "dropout": float(cfg.get("lora_dropout") or 0.0), "rslora": bool(cfg.get("use_rslora")), "init": "kaiming",
                "adapter_dtype": "float32", "bias": "bias" in parts,
            }
            sites.append(Site(module, "lora", spec))
            ours[f"{module}.lora_A"], ours[f"{module}.lora_B"] = parts["A"], parts["B"]
            if "bias" in parts:
                ours[f"{module}.bias_delta"] = parts["bias"].to(base.bias.dtype) - base.bias.detach().cpu()
        for module in bitfit:
            base = base_module(model.get_submodule(module))
            sites.append(Site(module, "bitfit", {}))
            ours[f"{module}.bias_delta"] = rest[f"{module}.bias"].to(base.bias.dtype) - base.bias.detach().cpu()
        for module in saved_modules:
            sites.append(Site(module, "modules_to_save", {}))
            ours.update({k: v for k, v in rest.items() if k.startswith(module + ".")})
    config = LoRAConfig(
        r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout") or 0.0),
        use_rslora=bool(cfg.get("use_rslora")), bias=cfg.get("bias") or "none",
        target_modules=[s.module for s in sites if s.layer == "lora"], modules_to_save=list(saved_modules) or None,
    )
    _install(model, adapter_name, config, sites, ours, str(path))
    return adapter_name


def _prefixes(key: str) -> list[str]:
    """``a.b.c.weight`` -> ``["a.b.c", "a.b", "a"]`` (longest first)."""
    parts = key.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
