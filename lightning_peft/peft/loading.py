"""Reading adapter files safely, and filling a rebuilt adapter from saved tensors.

Every reader names the file it failed on and says what to do: a damaged JSON, a truncated
safetensors file, a checkpoint that is truncated or holds Python objects that could run code
(checkpoints are read with ``weights_only=True``). :func:`install` rebuilds an adapter at its
saved sites and copies the tensors in, all or nothing.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..groups.matching import format_names
from .config import MethodConfig
from .functional import (
    active_adapters,
    adapter_state_dict,
    delete_adapter,
    list_adapters,
    place_adapter,
    set_adapter,
)
from .registry import METHODS, Site, method_for

__all__ = ["check_finite", "file_sha256", "install", "read_checkpoint", "read_json", "read_safetensors", "reroot"]


def _safetensors():
    import safetensors.torch

    return safetensors.torch


def file_sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def read_json(file: Path, what: str) -> Any:
    """``file`` parsed as JSON; a damaged file is a ``ValueError`` naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the {what} is damaged or was edited by hand. "
                         "Save or download the adapter again.") from None


def read_safetensors(file: Path, what: str, blob: bytes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors ``file`` (or of its bytes ``blob``); a damaged file is a ``ValueError`` naming it."""
    from safetensors import SafetensorError

    try:
        return _safetensors().load(blob) if blob is not None else _safetensors().load_file(str(file))
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"{file} cannot be read as safetensors ({e}): the {what} is truncated or damaged. "
                         "Save or download the adapter again.") from None


def _safe_globals() -> list[Any]:
    """What Lightning checkpoints hold beside tensors and plain data: ``hparams`` containers, paths, our configs."""
    from lightning.fabric.utilities.data import AttributeDict

    return [AttributeDict, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
            *(m.config for m in METHODS.values())]


def read_checkpoint(file: Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True``: a crafted file cannot run code while it loads.

    Raises:
        ValueError: the file holds other Python objects (named, with how to allow them), is
            truncated, or is no checkpoint.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except Exception:
            unsafe = re.findall(r"GLOBAL ([\w.]+)", str(e))
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        found = format_names(unsafe, 6) if unsafe else detail.group(1) if detail else "objects the safe unpickler does not know"
        raise ValueError(
            f"Refused to load {file}: it stores Python objects that could run code when unpickled ({found}). "
            "Checkpoints are read with weights_only=True. If the file comes from a source you trust, allow those "
            "classes with torch.serialization.add_safe_globals([...]) and load it again."
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"{file} cannot be read as a checkpoint ({type(e).__name__}: {e}): it is truncated, damaged or "
                         "not a PyTorch checkpoint. Copy it again, or pick another checkpoint.") from None
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{file} is not a Lightning checkpoint (no 'state_dict' mapping); pass a checkpoint saved by a Trainer")
    return dict(checkpoint)


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, path: Path, allow: bool) -> None:
    """Refuse to write NaN/inf tensors (a diverged run) unless ``allow``."""
    if allow:
        return
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{what} has non-finite values (NaN or inf) in {len(bad)} tensors: {format_names(sorted(bad), 6)}. The run "
            f"probably diverged; nothing was written to {path}. Save an earlier checkpoint's adapter, or pass "
            "allow_non_finite=True to write them anyway."
        )


def reroot(model: nn.Module, sites: list[Site], tensors: Mapping[str, torch.Tensor]) -> tuple[list[Site], dict[str, torch.Tensor]]:
    """Sites and tensors re-rooted onto ``model`` when they were saved one wrapper further out or in.

    An adapter saved from a training run names modules from the LightningModule
    (``model.model.layers.0.self_attn.q_proj``); loading it onto the bare ``transformers`` model
    (``model.layers.0…``) drops the leading ``model.``, and the other way round adds it. Only a
    unique re-rooting under which every site exists is used; otherwise names stay as saved, and
    the usual "No module" error names what is missing.
    """
    names = {n for n, _ in model.named_modules()}
    modules = [s.module for s in sites]
    if not modules or all(m in names for m in modules):
        return sites, dict(tensors)
    head = modules[0].split(".")
    candidates = [(".".join(head[:k]) + ".", "") for k in range(1, len(head))]
    candidates += [("", f"{n}.") for n in sorted(names) if n]
    fits = [(strip, add) for strip, add in candidates
            if all(m.startswith(strip) and add + m[len(strip):] in names for m in modules)]
    if len(fits) != 1:
        return sites, dict(tensors)
    strip, add = fits[0]

    def move(name: str) -> str:
        return add + name[len(strip):] if name.startswith(strip) else name

    moved = [Site(move(s.module), s.layer, {**s.spec, "tied_to": move(s.spec["tied_to"])} if isinstance(s.spec.get("tied_to"), str) else s.spec)
             for s in sites]
    return moved, {move(k): v for k, v in tensors.items()}


def install(
    model: nn.Module, name: str, config: MethodConfig, sites: list[Site], tensors: Mapping[str, torch.Tensor], source: str,
    check: Callable[[], None] | None = None,
) -> None:
    """Add adapter ``name`` at ``sites`` and fill it from ``tensors`` (keys as in adapter_state_dict), all or nothing.

    ``check`` runs once the adapter is in place (e.g. that the base weights are the right ones); if it
    raises, the adapter is removed again.
    """
    sites, tensors = reroot(model, sites, tensors)
    if name in list_adapters(model):
        raise ValueError(f"Adapter {name!r} already exists on {type(model).__name__}; load it under another adapter_name")
    method = method_for(config)
    if method.prepare is not None:  # e.g. QLoRA: quantize the fresh base the same way
        method.prepare(model, config, [s.module for s in sites if s.layer == "modules_to_save"])

    def fill() -> None:
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

    flags = [(p, p.requires_grad) for p in model.parameters()]
    active = active_adapters(model)
    place_adapter(model, sites, name, config, fill)
    if check is not None:
        try:
            check()
        except BaseException:  # as it was: no adapter, same active adapters, same trainable flags
            delete_adapter(model, name)
            if active:
                set_adapter(model, active)
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
