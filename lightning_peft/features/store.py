"""A content-addressed store of per-example features, and the fingerprints that key it on disk.

Each example's feature row is keyed by a hash of the example's own input tensors (the row of every
batched input, restricted to its real tokens when an ``attention_mask`` is given, so padding to the
batch's longest sequence does not matter). Changed data therefore never meets a stale feature: a new
or edited example simply has no entry yet. The model side is keyed by :func:`module_fingerprint`
(weights, buffers, architecture and configuration), which names the file on disk and is checked
again against the metadata stored inside it. Files are written atomically and carry a SHA-256 of
their payload, so a truncated, garbled or stale file is detected and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.atomic_files import atomic_write_bytes
from ..utils.fingerprint import module_fingerprint
from ..utils.fingerprint import raw_bytes as _raw

__all__ = ["FORMAT", "KEY_BYTES", "VERSION", "FeatureStore", "module_fingerprint", "sample_keys"]

KEY_BYTES = 16
FORMAT = "lightning_peft.features.store"
VERSION = 1
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")



def _leaves(path: str, value: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k in sorted(value, key=str):
            yield from _leaves(f"{path}.{k}", value[k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(f"{path}[{i}]", v)
    else:
        yield path, value


def sample_keys(
    args: Sequence[Any], kwargs: Mapping[str, Any], mask_key: str = "attention_mask", extra: Mapping[str, Tensor] | None = None
) -> list[bytes]:
    """One key per example of a forward call: a hash of the example's rows of every batched input.

    Inputs whose first dimension is the batch size ``B`` are per-example; anything else (flags,
    scalars) is hashed into every key. When ``kwargs[mask_key]`` is a ``(B, L)`` mask, inputs of
    shape ``(B, L, ...)`` contribute only their real positions, so the key does not depend on how
    much padding the batch needed. ``extra``: per-example tensors ``(B, ...)`` that reach the model
    another way (knowledge injection's external vectors), hashed whole. Inputs are copied to the CPU
    to be hashed.

    Returns:
        ``B`` keys of :data:`KEY_BYTES` bytes.
    """
    leaves = list(_leaves("args", list(args))) + list(_leaves("kwargs", dict(kwargs)))
    batched = [t for _, t in leaves if isinstance(t, Tensor) and t.dim() > 0]
    if not batched:
        raise ValueError("FeatureCache: the forward call has no tensor inputs to key the examples by.")
    batch = batched[0].shape[0]
    mask = kwargs.get(mask_key)
    select = None
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == batch:
        select = mask.detach().cpu().bool()
    shared = hashlib.blake2b(digest_size=KEY_BYTES)
    rows: list[tuple[str, Tensor]] = []
    for path, value in leaves:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            rows.append((path, value.detach().cpu()))
        elif isinstance(value, Tensor):
            shared.update(f"{path}:{value.dtype}:{tuple(value.shape)}".encode() + _raw(value.detach().cpu()))
        else:
            shared.update(f"{path}={_ADDRESS.sub('', repr(value))}".encode())
    whole = [(f"extra.{k}", v.detach().cpu()) for k, v in sorted((extra or {}).items())]
    for path, t in whole:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError(f"FeatureCache: {path} has shape {tuple(t.shape)}, not one row per example of the batch ({batch})")
    keys = []
    for i in range(batch):
        h = shared.copy()
        for path, t in rows + whole:
            row = t[i]
            if select is not None and t.dim() >= 2 and t.shape[1] == select.shape[1] and not path.startswith("extra."):
                row = row[select[i]]
            h.update(f"{path}:{t.dtype}:{tuple(row.shape)}".encode())
            h.update(_raw(row))
        keys.append(h.digest())
    return keys



def _payload_digest(keys: Tensor, features: Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{tuple(keys.shape)}|{features.dtype}|{tuple(features.shape)}|".encode())
    h.update(_raw(keys))
    h.update(_raw(features))
    return h.hexdigest()


class FeatureStore:
    """Feature rows ``(D,)`` by example key; looked up a batch at a time as ``(B, D)``."""

    def __init__(self) -> None:
        self._index: dict[bytes, int] = {}
        self._chunks: list[Tensor] = []
        self._features: Tensor | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    @property
    def features(self) -> Tensor | None:
        """All rows ``(N, D)`` in insertion order (``None`` when empty)."""
        if self._chunks:
            parts = ([self._features] if self._features is not None else []) + self._chunks
            self._features = torch.cat([p.to(parts[0].device) for p in parts])
            self._chunks = []
        return self._features

    def missing(self, keys: Sequence[bytes]) -> list[int]:
        """Positions in ``keys`` that have no entry."""
        return [i for i, k in enumerate(keys) if k not in self._index]

    def lookup(self, keys: Sequence[bytes], device: torch.device | None = None) -> Tensor:
        """Rows for ``keys`` as ``(B, D)``, on ``device`` (KeyError if any is missing)."""
        rows = torch.tensor([self._index[k] for k in keys], dtype=torch.long)
        features = self.features
        if device is not None and features.device != device:
            self._features = features = features.to(device)
        return features.index_select(0, rows.to(features.device))

    def add(self, keys: Sequence[bytes], features: Tensor) -> int:
        """Store rows of ``features`` ``(B, D)`` for keys without an entry; return how many were new."""
        if features.dim() != 2 or features.shape[0] != len(keys):
            raise ValueError(f"FeatureCache: expected features of shape (batch={len(keys)}, dim), got {tuple(features.shape)}")
        current = self.features
        if current is not None and (current.shape[1:] != features.shape[1:] or current.dtype != features.dtype):
            raise ValueError(
                f"FeatureCache: features changed shape/dtype from {tuple(current.shape[1:])} {current.dtype} to "
                f"{tuple(features.shape[1:])} {features.dtype} within one cache."
            )
        new: list[int] = []
        for i, key in enumerate(keys):
            if key not in self._index:  # also skips a duplicate example later in the same batch
                self._index[key] = len(self._index)
                new.append(i)
        if new:
            self._chunks.append(features.detach()[torch.tensor(new, device=features.device)])
        return len(new)

    def clear(self) -> None:
        self._index.clear()
        self._chunks = []
        self._features = None

    def save(self, path: str | Path, meta: Mapping[str, Any]) -> Path:
        """Write every entry and ``meta`` atomically, with a SHA-256 of the payload."""
        ordered = sorted(self._index, key=self._index.__getitem__)
        keys = torch.frombuffer(bytearray(b"".join(ordered)), dtype=torch.uint8).reshape(len(ordered), KEY_BYTES)
        features = self.features.detach().cpu().contiguous()
        blob = {
            "format": FORMAT, "version": VERSION, "meta": dict(meta), "keys": keys, "features": features,
            "sha256": _payload_digest(keys, features),
        }
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path, meta: Mapping[str, Any]) -> tuple[FeatureStore | None, str | None]:
        """(store, None) when ``path`` is intact and was written for ``meta``; else (None, what is wrong)."""
        path = Path(path)
        if not path.exists():
            return None, "missing"
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            return None, f"corrupt (unreadable: {type(err).__name__}: {str(err)[:120]})"
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("version") != VERSION:
            return None, "corrupt (not a lightning_peft feature cache of this version)"
        keys, features = blob.get("keys"), blob.get("features")
        if not isinstance(keys, Tensor) or not isinstance(features, Tensor) or keys.dim() != 2 or keys.shape[1] != KEY_BYTES \
                or features.shape[0] != keys.shape[0]:
            return None, "corrupt (malformed payload)"
        if blob.get("sha256") != _payload_digest(keys, features):
            return None, "corrupt (checksum mismatch)"
        stored = blob.get("meta") or {}
        differs = sorted(k for k in set(meta) | set(stored) if stored.get(k) != meta.get(k))
        if differs:
            return None, f"stale (written for another {', '.join(differs)})"
        store = cls()
        raw = keys.numpy().tobytes()
        store._index = {raw[i * KEY_BYTES : (i + 1) * KEY_BYTES]: i for i in range(keys.shape[0])}
        store._features = features
        if len(store._index) != keys.shape[0]:
            return None, "corrupt (duplicate keys)"
        return store, None
