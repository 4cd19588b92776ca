"""Hugging Face PEFT's adapter layout, both ways: :func:`export_peft` and :func:`import_peft`.

PEFT's layout is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``lora_embedding_A`` for embeddings,
``<module>.base_layer.bias`` for trained biases, plain keys for ``modules_to_save``), relative to
the ``transformers`` model inside yours -- what ``PeftModel.from_pretrained`` reads. Our exports
are written all or nothing and carry ``lightning_peft_manifest.json`` (SHA-256 of every file; PEFT
ignores it), so a folder mixing files of two exports is refused; folders written by PEFT itself
have no manifest and are read as they are.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..groups.matching import format_names
from ..utils.atomic_folder import atomic_folder, resolve_folder
from .dora import oriented_weight
from .functional import unmerged
from .layer import adapter_layers
from .loading import check_finite, file_sha256, install, read_json, read_safetensors
from .lora import LoRAConfig, lora_kind
from .lora_init import decompose, parse_init
from .lora_params import match_parameters
from .registry import Site, peft_exporter
from .targeting import base_module, hf_models
from .trainable_tokens import PEFT_TOKENS_KEY, token_sites

__all__ = ["export_peft", "import_peft", "peft_task_type"]

log = logging.getLogger(__name__)

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
EXTRA_WEIGHTS = "lightning_peft_extra.safetensors"  # tensors outside the transformers model (PEFT ignores the file)
MANIFEST = "lightning_peft_manifest.json"  # SHA-256 of each file of an export (PEFT ignores the file)
OWNED = (PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN, EXTRA_WEIGHTS, MANIFEST)
PEFT_PREFIX = "base_model.model."
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def peft_task_type(hf: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a ``transformers`` model (``CAUSAL_LM``, ``SEQ_CLS``...), what ``AutoPeftModel`` needs."""
    name = type(hf).__name__
    if name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if getattr(getattr(hf, "config", None), "is_encoder_decoder", False) else "CAUSAL_LM"
    for suffix, task in _TASKS:
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if name.endswith("Model") and hasattr(hf, "config") else None


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


def export_peft(model: nn.Module, path: str | Path, adapter_name: str = "default", root: str | None = None,
                allow_non_finite: bool = False, convert_init: bool = True) -> Path:
    """Write a LoRA adapter in PEFT's layout, loadable with ``PeftModel.from_pretrained(base, path)``.

    ``root`` names the base model PEFT will wrap (default: the ``transformers`` model inside
    ``model``); keys are relative to it. Tensors outside it (say a head of your LightningModule) go
    to ``lightning_peft_extra.safetensors``, which :func:`import_peft` reads and PEFT ignores (a
    warning lists them). ``task_type`` comes from the model's class, so
    ``AutoPeftModelForCausalLM.from_pretrained(path)`` works when the base was loaded from a folder
    or the Hub. The folder is replaced all or nothing; non-finite tensors are refused unless
    ``allow_non_finite=True``. PiSSA / OLoRA adapters, whose base holds a residual, are written converted
    to a plain rank-2r LoRA of the original base (``init_lora_weights: true``), as PEFT's
    ``path_initial_model_for_weight_conversion`` does: load them onto the original pretrained model.
    ``convert_init=False`` writes them as trained with ``init_lora_weights: "pissa"`` / ``"olora"`` instead
    (rank r; PEFT and :func:`import_peft` recompute the residual from the original base when loading).
    """
    from .adapter_files import adapter_config

    config = adapter_config(model, adapter_name)
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"PEFT export covers LoRA adapters; {adapter_name!r} is {config.method} (use save_adapter)")
    if config.init == "loftq":
        raise ValueError(f"Adapter {adapter_name!r} was initialised with LoftQ, whose quantized base PEFT would not rebuild "
                         "the same way; use save_adapter (load_adapter re-derives the base from the float model)")
    if not convert_init and parse_init(config.init)[1] is not None:
        raise ValueError(f"export_peft(convert_init=False): init={config.init!r} is a randomized SVD that cannot be recomputed "
                         "when loading; keep convert_init=True (a plain LoRA of the original base)")
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
    token_indices: dict[str, list[int]] = {}  # trainable tokens: module -> token ids (tied modules follow in PEFT too)
    target_parameters: list[str] = []  # LoRA on parameters: <module>.<param>
    with unmerged(model):
        for name, layer in adapter_layers(model):
            if adapter_name not in layer.adapters:
                continue
            adapter = layer.adapters[adapter_name]
            form = getattr(adapter, "inference_form", None)  # PiSSA / OLoRA: the plain LoRA of the original base
            adapter = form() if layer.method == "lora" and callable(form) and convert_init else adapter
            rel = _relative(name, root)
            out = tensors if rel is not None else extra
            key = PEFT_PREFIX + (rel if rel is not None else name)
            exporter = peft_exporter(layer.method)
            if exporter is None:
                raise ValueError(f"PEFT export cannot write {layer.method} layers (at {name!r})")
            out.update(exporter(layer, adapter, key))
            if layer.method == "lora" and rel is not None:
                targets.append(rel)
                fan_in_fan_out |= adapter.kind == "conv1d"
                if adapter.spec["r"] != config.r:
                    rank_pattern[re.escape(rel)] = adapter.spec["r"]
                if adapter.spec["alpha"] != config.alpha:
                    alpha_pattern[re.escape(rel)] = adapter.spec["alpha"]
            elif layer.method == "modules_to_save":
                (saved if rel is not None else extra_saved).append(rel if rel is not None else name)
            elif layer.method == "lora_param":
                if rel is None:
                    raise ValueError(f"PEFT export: LoRA on parameters of {name!r} lies outside {root!r}; PEFT cannot hold it (use save_adapter)")
                for pname, factors in adapter.factors.items():
                    target_parameters.append(f"{rel}.{pname}")
                    if factors.r != config.r:
                        rank_pattern[re.escape(f"{rel}.{pname}")] = factors.r
            elif layer.method == "trainable_tokens" and not adapter.tied:
                if rel is None:
                    raise ValueError(f"PEFT export: trainable tokens of {name!r} lie outside {root!r}; PEFT cannot hold them (use save_adapter)")
                token_indices[rel] = list(adapter.spec["indices"])
        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
        extra = {k: v.detach().contiguous().cpu().clone() for k, v in extra.items()}
    if not targets and not target_parameters:
        raise ValueError(f"Adapter {adapter_name!r} has no LoRA layers inside {root or 'the model'!r}; nothing PEFT could load")
    check_finite({**tensors, **extra}, f"export_peft: adapter {adapter_name!r}", path, allow_non_finite)
    hf = model.get_submodule(root) if root else model
    peft_config = {
        "peft_type": "LORA", "task_type": peft_task_type(hf), "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(hf, "config", None), "_name_or_path", None) or None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": config.bias, "modules_to_save": saved or None, "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True if convert_init or config.init in ("kaiming", "gaussian") else config.init,  # PiSSA/OLoRA
        "use_dora": config.use_dora, "layers_to_transform": None, "layers_pattern": None,
        "revision": None, "exclude_modules": None, "trainable_token_indices": token_indices or None,
        "target_parameters": target_parameters or None,
    }
    import safetensors.torch as st

    with atomic_folder(path, owned=OWNED) as tmp:
        (tmp / PEFT_WEIGHTS).write_bytes(st.save(tensors))
        if extra:
            (tmp / EXTRA_WEIGHTS).write_bytes(st.save(extra, metadata={"modules_to_save": json.dumps(extra_saved)}))
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"format": "lightning_peft.manifest", "files": files}, indent=2) + "\n")
    if extra:
        log.warning(
            "export_peft: %d tensors lie outside %r and went to %s; PEFT will not load them (import_peft does): %s",
            len(extra), root, EXTRA_WEIGHTS, format_names(sorted(extra), 10),
        )
    return path


def _check_manifest(folder: Path) -> None:
    """Our exports: every file is the one the manifest lists (a folder mixing two exports is refused)."""
    if not (folder / MANIFEST).exists():
        return  # written by PEFT itself: taken as it is
    listed = read_json(folder / MANIFEST, "export's manifest").get("files", {})
    present = {name for name in OWNED if name != MANIFEST and (folder / name).exists()}
    wrong = sorted(n for n in present | set(listed) if n not in listed or not (folder / n).exists() or file_sha256(folder / n) != listed[n])
    if wrong:
        raise ValueError(f"{folder}: {', '.join(wrong)} do not match {MANIFEST}: the folder mixes files of different "
                         "exports or holds a damaged file. Export the adapter again, or copy all files of one export.")


_UNSUPPORTED = ("lora_bias", "layer_replication", "alora_invocation_tokens")
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
             ".base_layer.bias": "bias", ".base_layer.weight": "base_weight", ".lora_magnitude_vector": "magnitude"}


def _pattern(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / PEFT_WEIGHTS).exists():
        return read_safetensors(path / PEFT_WEIGHTS, "PEFT adapter weights")
    if (path / PEFT_WEIGHTS_BIN).exists():
        try:
            return torch.load(path / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path / PEFT_WEIGHTS_BIN} cannot be read ({type(e).__name__}: {e}); it is damaged or holds "
                             "more than tensors. Download or export the adapter again.") from None
    raise FileNotFoundError(f"{path} has {PEFT_CONFIG} but neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")


def import_peft(model: nn.Module, path: str | Path, adapter_name: str = "default", root: str | None = None) -> str:
    """Add a LoRA adapter saved by Hugging Face PEFT (or :func:`export_peft`) to ``model``; returns its name.

    The modules to wrap come from the tensor file's keys, ranks from the tensor shapes and scaling
    from ``adapter_config.json``; DoRA adapters (``use_dora``, ``lora_magnitude_vector``) are read as
    such, and so are trainable tokens and LoRA on parameters (``target_parameters``, e.g. MoE experts).
    Options PEFT has and we do not (LoRA bias, layer replication) are an error, never ignored. PiSSA /
    OLoRA adapters saved unconverted (``init_lora_weights="pissa"``) give the base the same residual
    again, as PEFT does when it loads them; converted ones are plain LoRA. Full embedding weights PEFT
    saves beside an embedding LoRA (``save_embedding_layers``) must equal the model's.
    """
    path = resolve_folder(Path(path))
    cfg = read_json(path / PEFT_CONFIG, "PEFT adapter config")
    if not isinstance(cfg, Mapping) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, Mapping) else type(cfg).__name__
        raise ValueError(f"{path / PEFT_CONFIG}: peft_type {got!r}; import_peft reads LORA adapters")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise ValueError(f"{path / PEFT_CONFIG}: {key}={cfg[key]!r} is not supported by lightning_peft's LoRA")
    init = _base_changing_init(cfg, path)
    _check_manifest(path)
    file_tensors = _read_peft_tensors(path)
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

        extra_tensors = read_safetensors(path / EXTRA_WEIGHTS, "extra tensors of the export")
        with safe_open(str(path / EXTRA_WEIGHTS), "pt") as f:
            extra_saved = json.loads((f.metadata() or {}).get("modules_to_save", "[]"))
        tensors.update({k[len(PEFT_PREFIX) :]: v for k, v in extra_tensors.items()})

    tokens = {key[: -len(PEFT_TOKENS_KEY)]: tensors.pop(key) for key in list(tensors) if key.endswith(PEFT_TOKENS_KEY)}
    param_sites, param_tensors = _param_lora(model, cfg, tensors, root, path)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for suffix, part in _SUFFIXES.items():
            if key.endswith(suffix):
                lora.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            rest[key] = value
    module_names = {n for n, _ in model.named_modules()}
    for module, parts in list(lora.items()):  # full embedding weights PEFT saves beside an embedding LoRA
        if "base_weight" in parts:
            _check_saved_base_weight(model, module, parts.pop("base_weight"), module_names, path)
            if not parts:
                del lora[module]
    saved_patterns = cfg.get("modules_to_save") or []
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
            if init != "kaiming":  # PiSSA / OLoRA saved unconverted: the base takes the same residual again, as in PEFT
                spec["init"] = init
                scale = spec["alpha"] / (spec["r"] ** 0.5 if spec["rslora"] else spec["r"])
                a0, b0 = decompose(oriented_weight(base, kind, torch.float32), spec["r"], scale, init)
                ours[f"{module}.lora_A_init"], ours[f"{module}.lora_B_init"] = a0, b0
            if "magnitude" in parts:  # DoRA
                spec["dora"] = True
                ours[f"{module}.lora_magnitude_vector"] = parts["magnitude"]
            elif cfg.get("use_dora"):
                raise ValueError(f"{path}: use_dora is set but {module!r} has no lora_magnitude_vector (an incomplete DoRA adapter)")
            sites.append(Site(module, "lora", spec))
            ours[f"{module}.lora_A"], ours[f"{module}.lora_B"] = parts["A"], parts["B"]
            if "bias" in parts:
                ours[f"{module}.bias_delta"] = parts["bias"].to(base.bias.dtype) - base.bias.detach().cpu()
        for module in bitfit:
            base = base_module(model.get_submodule(module))
            sites.append(Site(module, "bitfit", {}))
            ours[f"{module}.bias_delta"] = rest[f"{module}.bias"].to(base.bias.dtype) - base.bias.detach().cpu()
        sites.extend(param_sites)
        ours.update(param_tensors)
        token_targets = _token_targets(cfg.get("trainable_token_indices"), tokens, root, path)
        unknown = [m for m in token_targets if m not in module_names]
        if unknown:
            raise ValueError(f"{path}: the adapter trains token rows of {unknown}, which {type(model).__name__} does not have (a different base model?)")
        for site in token_sites(model, token_targets):
            sites.append(site)
            if site.spec["tied_to"] is None:
                ours[f"{site.module}.rows"] = tokens[site.module]
        for module in saved_modules:
            sites.append(Site(module, "modules_to_save", {}))
            ours.update({k: v for k, v in rest.items() if k.startswith(module + ".")})
    config = LoRAConfig(
        r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout") or 0.0),
        use_rslora=bool(cfg.get("use_rslora")), bias=cfg.get("bias") or "none", use_dora=bool(cfg.get("use_dora")), init=init,
        target_modules=[s.module for s in sites if s.layer == "lora"] or None, modules_to_save=list(saved_modules) or None,
        trainable_token_indices=token_targets or None,
        target_parameters=[f"{s.module}.{p}" for s in param_sites for p in s.spec["params"]] or None,
    )
    install(model, adapter_name, config, sites, ours, str(path))
    return adapter_name


def _param_lora(model: nn.Module, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor], root: str,
                path: Path) -> tuple[list[Site], dict[str, torch.Tensor]]:
    """PEFT's ``target_parameters``: pop each parameter's ``lora_A``/``lora_B`` from ``tensors`` (keyed by PEFT's nesting
    of ParamWrappers, see :func:`~lightning_peft.peft.lora_params.peft_param_keys`) and return our sites and tensors."""
    from .lora_params import peft_param_keys

    patterns = cfg.get("target_parameters")
    if not patterns:
        return [], {}
    hf = model.get_submodule(root) if root else model
    absolute = lambda rel: f"{root}.{rel}" if root else rel
    sites, ours = [], {}
    for rel, names in match_parameters(hf, list(patterns)).items():
        module = absolute(rel)
        options = {}
        for name, prefix in peft_param_keys(module, names).items():
            a, b = tensors.pop(f"{prefix}.lora_A.weight", None), tensors.pop(f"{prefix}.lora_B.weight", None)
            if a is None or b is None:
                raise ValueError(f"{path}: target_parameters names {rel}.{name} but the weights lack its lora_A/lora_B ({prefix}.lora_A.weight)")
            param = getattr(base_module(model.get_submodule(module)), name)
            experts = param.shape[0] if param.dim() == 3 else 1
            rank = a.shape[0] // experts
            alpha = _pattern(cfg.get("alpha_pattern") or {}, f"{rel}.{name}", cfg.get("lora_alpha", 8))
            options[name] = {"r": int(rank), "alpha": float(alpha)}
            ours[f"{module}.factors.{name}.lora_A"], ours[f"{module}.factors.{name}.lora_B"] = a, b
        sites.append(Site(module, "lora_param", {"params": options, "rslora": bool(cfg.get("use_rslora")), "adapter_dtype": "float32"}))
    return sites, ours


def _token_targets(indices: Any, tokens: dict[str, torch.Tensor], root: str, path: Path) -> dict[str, list[int]]:
    """Module -> token ids of PEFT's trainable tokens: ``trainable_token_indices`` is the ids (of the one saved
    embedding) or ``{module: ids}`` (keys match a module name's end, as in PEFT); each saved tensor has one row per id."""
    if bool(tokens) != bool(indices):
        raise ValueError(f"{path}: trainable_token_indices={indices!r} but the weights hold trainable tokens of "
                         f"{sorted(tokens) or 'no module'}; the config and the weights do not belong together")
    targets: dict[str, list[int]] = {}
    for module, rows in tokens.items():
        rel = _relative(module, root) or module
        if isinstance(indices, Mapping):
            ids = next((v for k, v in indices.items() if rel == k or rel.endswith("." + k)), None)
        else:
            ids = indices if len(tokens) == 1 else None
        if ids is None:
            raise ValueError(f"{path}: trainable tokens of {rel!r} are saved but trainable_token_indices={indices!r} gives no ids for it")
        if rows.dim() != 2 or rows.shape[0] != len(ids):
            raise ValueError(f"{path}: {rel!r} has {len(ids)} trainable token ids but saved rows of shape {tuple(rows.shape)}")
        targets[module] = [int(i) for i in ids]
    return targets


_PLAIN_INITS = ("gaussian", "orthogonal", "eva", "mica")


def _base_changing_init(cfg: Mapping[str, Any], path: Path) -> str:
    """``init_lora_weights`` of a PEFT config as our ``init``: ``"kaiming"`` for the plain ones, ``"pissa"``/``"olora"`` for
    adapters saved unconverted (their base must be given the same residual); anything else is refused."""
    value = cfg.get("init_lora_weights", True)
    if value is None or isinstance(value, bool) or value in _PLAIN_INITS:
        return "kaiming"  # the base is untouched (False: random B at init): the trained A, B are all there is
    kind, niter = parse_init(value) if isinstance(value, str) else (None, None)
    if kind == "olora" or (kind == "pissa" and niter is None):
        return value
    raise ValueError(
        f"{path / PEFT_CONFIG}: init_lora_weights={value!r} changed the base weights in a way that cannot be recomputed "
        "here (pissa_niter_<n> is randomized; other inits are not supported). Save it from PEFT converted to a plain LoRA "
        "(save_pretrained(..., path_initial_model_for_weight_conversion=...)), then import that."
    )


def _check_saved_base_weight(model: nn.Module, module: str, saved: torch.Tensor, module_names: set[str], path: Path) -> None:
    """PEFT saves the full weights of targeted embeddings (``save_embedding_layers``); they must be the model's own."""
    if module not in module_names:
        raise ValueError(f"{path}: the adapter holds weights of {module!r}, which {type(model).__name__} does not have (a different base model?)")
    weight = getattr(base_module(model.get_submodule(module)), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != saved.shape or not torch.equal(weight.detach().cpu(), saved.to(weight.dtype)):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise ValueError(
            f"{path}: the adapter file holds full weights of {module!r} (PEFT's save_embedding_layers, e.g. after resizing "
            f"the vocabulary) that differ from the model's (file {tuple(saved.shape)}, model {shape}): load the base model "
            "those embeddings belong to (resize its token embeddings and load them) before importing the adapter."
        )


def _prefixes(key: str) -> list[str]:
    """``a.b.c.weight`` -> ``["a.b.c", "a.b", "a"]`` (longest first)."""
    parts = key.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
