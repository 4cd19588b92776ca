"""DoRA (Liu et al. 2024): weight-decomposed LoRA, as Hugging Face PEFT computes it.

The adapted weight is ``m · (W + s·B·A) / ||W + s·B·A||_c``: a trainable magnitude ``m`` (one value
per output unit, PEFT's ``lora_magnitude_vector``) times the normalised direction of the LoRA-updated
weight. The norm is taken per output row (``nn.Linear`` / GPT-2 ``Conv1D``: over the input features;
``nn.Conv2d``: over input channels and kernel) and is treated as a constant in backward (section 4.3
of the paper, and PEFT): it carries no gradient.

Output, added to the base layer's (written so the base GEMM is reused, with ``f = m / ||W + s·B·A||``)::

    y_dora = (f - 1) · (W·x) + f · s · B·A·x          # W·x without bias: the base output minus its bias

Cost per forward: the norm needs ``W + s·B·A`` once (an out × in temporary and an r-deep product,
computed under ``no_grad``, so no graph or saved tensor is kept for it); nothing else beyond plain LoRA's
low-rank path. With dropout in training the base GEMM runs a second time on the dropped-out input, as in PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import dequantized_weight

__all__ = ["dora_delta", "dora_factor_shape", "dora_weight_norm", "oriented_weight"]


def oriented_weight(base: nn.Module, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The base weight in ``dtype``, oriented (out, in) for Linear / Conv1D and (out, in, kh, kw) for Conv2d; dequantized if needed."""
    if kind == "conv1d":
        return base.weight.detach().t().to(dtype)  # Conv1D stores (in, out)
    if kind == "linear":
        return dequantized_weight(base, dtype)
    return base.weight.detach().to(dtype)


def low_rank_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """B·A oriented like :func:`oriented_weight` (``shape``), unscaled."""
    r = lora_A.shape[0]
    return (lora_B.reshape(-1, r) @ lora_A.reshape(r, -1)).reshape(shape)


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + ΔW|| per output unit: shape (out,) for a 2-D weight, (1, out, 1, 1) for a conv weight (PEFT's shapes)."""
    total = weight + delta
    if total.dim() == 2:
        return torch.linalg.norm(total, dim=1).to(total.dtype)
    return total.norm(p=2, dim=tuple(range(1, total.dim())), keepdim=True).transpose(1, 0)


def dora_factor_shape(kind: str) -> tuple[int, ...]:
    """How ``m / ||W + ΔW||`` broadcasts over the base weight *as stored* (Conv1D stores (in, out))."""
    return {"linear": (-1, 1), "conv1d": (1, -1), "conv2d": (-1, 1, 1, 1)}[kind]


def dora_delta(adapter: nn.Module, x: torch.Tensor, base: nn.Module, base_result: torch.Tensor | None) -> torch.Tensor:
    """DoRA's additive term for input ``x`` (already in the adapter's dtype); ``base_result``: the base layer's output or ``None``.

    ``base_result`` saves the second GEMM when no dropout is active (its bias is taken off here).
    Shapes: x (..., in) -> (..., out); Conv2d (N, C, H, W) -> (N, out, H', W').
    """
    kind, a, b = adapter.kind, adapter.lora_A, adapter.lora_B
    weight = oriented_weight(base, kind, x.dtype)
    with torch.no_grad():  # a constant in backward (section 4.3): no graph for the out x in temporary
        norm = dora_weight_norm(weight, adapter.scale * low_rank_weight(a.detach(), b.detach(), weight.shape).to(x.dtype))
    factor = adapter.lora_magnitude_vector / norm
    dropped = adapter.dropout(x)
    fresh = base_result is None or (isinstance(adapter.dropout, nn.Dropout) and adapter.training)
    if kind == "conv2d":
        lora_result = F.conv2d(base._conv_forward(dropped, a, None), b)
        if fresh:
            base_result = base._conv_forward(dropped, weight, None)
        elif base.bias is not None:
            base_result = base_result.to(x.dtype) - base.bias.to(x.dtype).view(1, -1, 1, 1)
    else:
        factor = factor.view(1, -1)
        lora_result = F.linear(F.linear(dropped, a), b)
        if fresh:
            base_result = F.linear(dropped, weight)
        elif base.bias is not None:
            base_result = base_result.to(x.dtype) - base.bias.to(x.dtype)
    return (factor - 1) * base_result.to(x.dtype) + factor * lora_result * adapter.scale
