"""LoRA initialisations that start from the base weight and change it: PiSSA and OLoRA (as Hugging Face PEFT computes them).

Both put a rank-r part of W into the adapter and leave the residual in the base, so the model is
unchanged at init: ``W = W_res + s·B₀·A₀``.

- PiSSA (Meng et al. 2024): the top-r singular triplets, ``A₀ = diag(√(S_r/s))·U_rᵀ``-side and
  ``B₀ = V_r·diag(√(S_r/s))`` (PEFT's names); ``pissa_niter_<n>`` uses torch's randomized
  ``svd_lowrank`` with n subspace iterations instead of a full SVD (much faster on large layers).
- OLoRA (Büyükakyüz 2024): a QR decomposition ``W = Q·R``, ``B₀ = Q[:, :r]``, ``A₀ = R[:r]``.
- LoftQ (Li et al. 2023, QLoRA only): :func:`loftq` picks the quantized base and A, B together so that
  Q + s·B·A is closer to W than Q alone; the base is re-derived from the float weight when an adapter is loaded.

Because the base changes, an adapter trained from these inits only reproduces the trained model on
the *residual* base. :class:`~lightning_peft.peft.lora.LoRA` keeps ``A₀``, ``B₀`` (buffers) and saves the
adapter converted to a plain rank-2r LoRA ``[A; A₀]``, ``[B, -B₀]`` that applies to the original base
(PEFT's ``path_initial_model_for_weight_conversion``). Deleting the adapter adds s·B₀·A₀ back; inside
``disable_adapters`` the model is the residual base alone, as in PEFT.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .quantization import QuantSpec, dequantized_weight, quantize_linear

__all__ = ["BASE_CHANGING_INITS", "base_changing", "decompose", "loftq", "parse_init"]

BASE_CHANGING_INITS = ("pissa", "pissa_niter_<n>", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


def parse_init(init: str) -> tuple[str, int | None]:
    """``"pissa_niter_4"`` -> ``("pissa", 4)``; ``"pissa"`` -> ``("pissa", None)``; others unchanged."""
    match = _NITER.fullmatch(init)
    return ("pissa", int(match.group(1))) if match else (init, None)


def base_changing(init: str) -> bool:
    """Whether ``init`` moves part of the base weight into the adapter (PiSSA, OLoRA)."""
    return parse_init(init)[0] in ("pissa", "olora")


def decompose(weight: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ (r, in), B₀ (out, r)) in fp32 for an (out, in) weight, such that ``s·B₀·A₀`` is its rank-r part."""
    weight = weight.detach().float()
    kind, niter = parse_init(init)
    if kind == "olora":
        q, rr = torch.linalg.qr(weight)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if niter is None:
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r] / scale, uh[:r]
    else:
        vr, sr, ur = torch.svd_lowrank(weight, r, niter=niter)
        sr, uhr = sr / scale, ur.t()
    root = torch.diag(torch.sqrt(sr))
    return root @ uhr, vr @ root


def loftq(linear: nn.Linear, r: int, scale: float, spec: QuantSpec, iterations: int = 1) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023): a quantized base Q and A (r, in), B (out, r) with Q + s·B·A close to the float weight W.

    Alternates ``Q = quant(W - s·B·A)`` and ``s·B·A = SVD_r(W - Q)`` ``iterations`` times (PEFT's ``loftq_init``,
    with bitsandbytes' own quantizer so Q is exactly what the returned layer computes with, and A, B divided by
    √s each so the scaled product is the SVD part; PEFT assumes s = 1). Plain QLoRA is ``Q = quant(W)``, B = 0:
    LoftQ lowers ``||W - (Q + s·B·A)||`` at init. Returns (the quantized layer, A, B), fp32.
    """
    weight = linear.weight.detach().float()
    residual, quantized, a, b = weight, None, None, None
    for _ in range(iterations):
        source = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device=weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            source.weight.copy_(residual.to(source.weight.dtype))
            if linear.bias is not None:
                source.bias.copy_(linear.bias)
        quantized = quantize_linear(source.train(linear.training), spec)
        u, s, vh = torch.linalg.svd(weight - dequantized_weight(quantized), full_matrices=False)
        root = torch.sqrt(s[:r] / scale)
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        residual = weight - scale * b @ a
    return quantized, a.contiguous(), b.contiguous()
