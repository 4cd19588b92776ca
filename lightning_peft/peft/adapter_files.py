"""Adapter files: our own format and Lightning adapter checkpoints (PEFT's layout: :mod:`.peft_format`).

Our format is a folder with ``adapter.safetensors`` (the adapter's tensors) and ``adapter.json``
(method config, the sites it wraps with their specs, and the SHA-256 of the tensor file). The
folder is written all or nothing (:func:`~lightning_peft.utils.atomic_folder.atomic_folder`), and
the checksum refuses a folder whose two files come from different saves. Loading replays the
sites, checks every key and shape against what the base model builds, and leaves the model
untouched when anything disagrees.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..groups.matching import format_names
from ..utils.atomic_folder import atomic_folder, resolve_folder
from .checkpoint import FINGERPRINT_KEY, base_fingerprint, state_base_fingerprint
from .config import MethodConfig
from .functional import adapter_sites, adapter_state_dict, list_adapters
from .layer import adapter_layers
from .loading import check_finite, install, read_checkpoint, read_json, read_safetensors
from .peft_format import (
    EXTRA_WEIGHTS,
    MANIFEST,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    PEFT_WEIGHTS_BIN,
    export_peft,
    import_peft,
)
from .registry import Site, config_from_dict

__all__ = ["adapter_config", "export_peft", "import_peft", "load_adapter", "save_adapter"]

log = logging.getLogger(__name__)

FORMAT, VERSION = "lightning_peft.adapter", 1
ADAPTER_JSON, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"
OWNED = (ADAPTER_JSON, ADAPTER_WEIGHTS)
_FOLDER_FILES = (ADAPTER_JSON, ADAPTER_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN, EXTRA_WEIGHTS, MANIFEST)


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


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", allow_non_finite: bool = False) -> Path:
    """Write the adapter alone (``adapter.safetensors`` + ``adapter.json``) into folder ``path``; returns it.

    The folder is replaced all or nothing: a crash leaves the previous save or the new one, never a
    mix (other files in it are kept). Non-finite tensors (a diverged run) are refused unless
    ``allow_non_finite=True``. Adapters with a training-only part write their inference form:
    prompt/prefix encoders (MLP, LSTM reparameterisations) are replaced by the final prompts they
    produce. Lightning checkpoints keep the encoders, so training resumes from them.
    """
    import safetensors.torch

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name, inference=True).items()}
    check_finite(state, f"save_adapter: adapter {adapter_name!r}", path, allow_non_finite)
    blob = safetensors.torch.save(state)
    meta = adapter_metadata(model, adapter_name, inference=True)
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()  # refuses a folder whose two files come from two saves
    with atomic_folder(path, owned=OWNED) as tmp:
        (tmp / ADAPTER_WEIGHTS).write_bytes(blob)
        (tmp / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def _check_format(meta: Any, source: Path) -> None:
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, Mapping) else (type(meta).__name__, None)
        raise ValueError(f"{source} is not a lightning_peft adapter of format {FORMAT} v{VERSION} (got {got[0]!r} v{got[1]!r})")


def _load_ours(model: nn.Module, folder: Path, adapter_name: str | None) -> str:
    meta = read_json(folder / ADAPTER_JSON, "adapter description")
    _check_format(meta, folder / ADAPTER_JSON)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing ({ADAPTER_JSON} is there): an incomplete copy of the adapter folder? Copy the whole folder.")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise ValueError(f"{weights} does not match {ADAPTER_JSON} (checksum differs): the folder holds parts of two saves "
                         "or a damaged file. Save the adapter again, or copy both files from the same save.")
    name = adapter_name or meta["adapter_name"]
    sites = [Site(**s) for s in meta["sites"]]
    install(model, name, config_from_dict(meta["config"]), sites, read_safetensors(weights, "adapter weights", blob), str(folder))
    return name


def _base_check(model: nn.Module, state: Mapping[str, Any], file: Path) -> None:
    """The checkpoint was trained on the base weights ``model`` holds (checked once its adapter is in place)."""
    saved = state.get(FINGERPRINT_KEY)
    if isinstance(saved, torch.Tensor):
        if saved.dtype != torch.uint8:
            rank_zero_warn(f"{file} has an old-style base fingerprint; the base weights are not checked. HINT: save it again.")
            return
        same = bytes(saved.tolist()).hex() == base_fingerprint(model)
    else:
        fingerprint, missing = state_base_fingerprint(model, state)
        if fingerprint is None:
            raise ValueError(f"{file} lacks frozen base weights the model has ({format_names(missing, 6)}) and no base "
                             f"fingerprint: it was not saved from this kind of model with the PEFT callback")
        same = fingerprint == base_fingerprint(model)
    if not same:
        raise ValueError(f"{file} was trained on other base weights than {type(model).__name__} holds (the fingerprints of "
                         "the frozen pretrained weights differ): load the pretrained model it was trained from.")


def _load_checkpoint(model: nn.Module, file: Path, adapter_name: str | None) -> str:
    checkpoint = read_checkpoint(file)
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
    sites = [Site(**s) for s in meta["sites"]]
    install(model, name, config_from_dict(meta["config"]), sites, tensors, str(file), check=lambda: _base_check(model, state, file))
    return name


def _folder_of(file: Path) -> Path:
    """The adapter folder a file of it belongs to (a user passed ``adapter.safetensors`` instead of its folder)."""
    if file.name in _FOLDER_FILES and ((file.parent / ADAPTER_JSON).exists() or (file.parent / PEFT_CONFIG).exists()):
        return file.parent
    raise ValueError(f"{file} is a single {file.suffix} file, not an adapter: pass the folder that holds {ADAPTER_JSON} "
                     f"(lightning_peft) or {PEFT_CONFIG} (Hugging Face PEFT) with its weights, or a Lightning checkpoint")


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> str:
    """Add a saved adapter to ``model`` and make it active; returns its name.

    ``path`` is a folder written by :func:`save_adapter` (or a file inside it), a folder in PEFT's
    layout (see :func:`import_peft`), or a Lightning checkpoint saved with the
    :class:`~lightning_peft.PEFT` callback (adapter-only or full; read with ``weights_only=True``
    and refused when it was trained on other base weights). Module names saved one wrapper further
    out or in (from a LightningModule, loaded onto its ``transformers`` model, or the reverse) are
    re-rooted onto ``model``. A file that does not fit the model
    (missing modules, other shapes, missing or extra tensors) is an error and the model is left as
    it was.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix not in (".safetensors", ".json", ".bin"):
            return _load_checkpoint(model, path, adapter_name)
        path = _folder_of(path)
    path = resolve_folder(path)
    if (path / ADAPTER_JSON).exists():
        return _load_ours(model, path, adapter_name)
    if (path / PEFT_CONFIG).exists():
        return import_peft(model, path, adapter_name or "default")
    raise FileNotFoundError(
        f"No adapter at {path}: expected a folder with {ADAPTER_JSON} (lightning_peft), {PEFT_CONFIG} (Hugging Face PEFT), "
        "or a Lightning checkpoint file"
    )
