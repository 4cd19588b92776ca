"""Pure-PyTorch LoRA linear and adapter bottleneck: the spec, the CPU fallback and the test oracle.

Everything here is plain differentiable PyTorch (autograd gives the gradients), so it runs on any
device and dtype and under ``torch.autocast``. The Triton kernels in :mod:`.lora` and
:mod:`.bottleneck` compute the same functions and are tested against these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "activation_fn",
    "adapter_bottleneck_reference",
    "autocast_cast",
    "check_adapter_args",
    "check_lora_args",
    "check_master_dtypes",
    "lora_linear_reference",
    "no_autocast",
]

_HALF = (torch.float16, torch.bfloat16)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, as nn.GELU()
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name``; a ValueError lists the valid names."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; valid activations are {sorted(ACTIVATIONS)}"
        ) from None


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def check_master_dtypes(compute: Tensor, compute_name: str, adapters: dict[str, Tensor | None]) -> None:
    """Each adapter-side tensor has ``compute``'s dtype, or float32 when that is fp16/bf16 (fp32 masters).

    Raises a TypeError naming the first tensor that fits neither. Mixed calls compute in the 16-bit
    dtype (operands rounded to it, fp32 accumulation) and return the masters' gradients in fp32.
    """
    for name, t in adapters.items():
        if t is None or t.dtype == compute.dtype or (t.dtype == torch.float32 and compute.dtype in _HALF):
            continue
        raise TypeError(
            f"dtype mismatch: {compute_name} is {compute.dtype} but {name} is {t.dtype}; cast them to one "
            "dtype (float32 adapter masters on a float16/bfloat16 input are accepted) or run under torch.autocast"
        )


def device_guard(t: Tensor):
    """``torch.cuda.device(t.device)`` for CUDA tensors (nothing assumes device 0), else a no-op."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def no_autocast(t: Tensor):
    """``torch.autocast(t.device.type, enabled=False)`` where autocast exists (CUDA, CPU), else a no-op (meta)."""
    return torch.autocast(t.device.type, enabled=False) if t.device.type in ("cuda", "cpu") else contextlib.nullcontext()


def autocast_cast(device_type: str, *tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for ``device_type``.

    Done outside the autograd.Function, so gradients flow back to the original dtype as with
    ``F.linear`` under autocast.
    """
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dt) if (t is not None and t.is_floating_point()) else t for t in tensors)


def check_lora_args(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor) -> None:
    """Raise a ValueError naming the argument whose shape does not fit ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {_shape(weight)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x must have shape (..., in_features={k}) to match weight {_shape(weight)}, got {_shape(x)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (out_features,) = ({n},), got {_shape(bias)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (r, in_features={k}), got {_shape(lora_a)}")
    r = lora_a.shape[0]
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"lora_b must have shape (out_features, r) = ({n}, {r}) to match weight {_shape(weight)} "
            f"and lora_a {_shape(lora_a)}, got {_shape(lora_b)}"
        )


def check_adapter_args(
    x: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None,
    residual: Tensor | None = None,
) -> None:
    """Raise a ValueError naming the argument whose shape does not fit the bottleneck adapter."""
    if w_down.dim() != 2:
        raise ValueError(f"w_down must be 2-D (bottleneck, features), got shape {_shape(w_down)}")
    m, d = w_down.shape
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x must have shape (..., features={d}) to match w_down {_shape(w_down)}, got {_shape(x)}")
    if b_down is not None and tuple(b_down.shape) != (m,):
        raise ValueError(f"b_down must have shape (bottleneck,) = ({m},), got {_shape(b_down)}")
    if tuple(w_up.shape) != (d, m):
        raise ValueError(
            f"w_up must have shape (features, bottleneck) = ({d}, {m}) to match w_down {_shape(w_down)}, "
            f"got {_shape(w_up)}"
        )
    if b_up is not None and tuple(b_up.shape) != (d,):
        raise ValueError(f"b_up must have shape (features,) = ({d},), got {_shape(b_up)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {_shape(x)}, got {_shape(residual)}")


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """LoRA linear layer, low-rank first: ``y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ``.

    ``W + B·A`` is never formed; the rank-r product is accumulated into the base output.

    Args:
        x: ``(..., K)`` input (2-D or 3-D in practice).
        weight: ``(N, K)`` base weight (``nn.Linear`` layout), usually frozen.
        bias: ``(N,)`` base bias or ``None``.
        lora_a: ``(r, K)`` down projection A.
        lora_b: ``(N, r)`` up projection B.
        scale: ``s``, usually ``alpha / r``.
        dropout_p: dropout on the LoRA branch input, applied whenever ``> 0`` (pass ``0.0`` in eval).

    Returns:
        ``(..., N)`` in x's dtype.

    Adapter masters wider than x (``lora_a``, ``lora_b``, ``bias`` in fp32 on a 16-bit ``x`` and
    ``weight``): the rank-r branch and the bias run in fp32 and y is rounded once to x's dtype, so
    their gradients are fp32 results, not 16-bit ones widened (as HF PEFT's fp32 adapters).

    Gradients (autograd), with ``x̃ = drop(x)``, ``h = x̃·Aᵀ`` ``(M, r)`` and ``dh = s·dy·B`` ``(M, r)``:
    ``dx = dy·W + drop'(dh·A)`` ``(M, K)``, ``dA = dhᵀ·x̃`` ``(r, K)``, ``dB = s·dyᵀ·h`` ``(N, r)``,
    ``dW = dyᵀ·x`` ``(N, K)`` and ``dbias = Σ_rows dy`` ``(N,)`` when the base is trainable.

    Example:
        >>> x, w = torch.randn(4, 8), torch.randn(6, 8)
        >>> a, b = torch.randn(2, 8), torch.zeros(6, 2)
        >>> torch.allclose(lora_linear_reference(x, w, None, a, b, 2.0), x @ w.T)
        True
    """
    check_lora_args(x, weight, bias, lora_a, lora_b)
    n = weight.shape[0]
    lead = x.shape[:-1]
    xd = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    wide = torch.promote_types(torch.promote_types(x.dtype, lora_a.dtype), lora_b.dtype)
    wide = wide if bias is None else torch.promote_types(wide, bias.dtype)
    if wide == x.dtype or torch.is_autocast_enabled(x.device.type):
        base = F.linear(x, weight, bias).reshape(-1, n)  # one dtype (or autocast): as it reads
        h = F.linear(xd, lora_a).reshape(-1, lora_a.shape[0])
        return torch.addmm(base, h, lora_b.t(), alpha=scale).reshape(*lead, n)
    # fp32 masters on a 16-bit x: the branch (and an fp32 bias) in fp32, one rounding to x's dtype
    base = F.linear(x, weight, bias if bias is None or bias.dtype == x.dtype else None).reshape(-1, n).to(wide)
    if bias is not None and bias.dtype != x.dtype:
        base = base + bias
    h = F.linear(xd.to(wide), lora_a.to(wide)).reshape(-1, lora_a.shape[0])
    return torch.addmm(base, h, lora_b.to(wide).t(), alpha=scale).to(x.dtype).reshape(*lead, n)


def adapter_bottleneck_reference(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """Bottleneck adapter: ``y = residual + s·(act(x·W_downᵀ + b_down)·W_upᵀ + b_up)``.

    Args:
        x: ``(..., d)`` input.
        w_down: ``(m, d)`` down projection; ``b_down``: ``(m,)`` or ``None``.
        w_up: ``(d, m)`` up projection; ``b_up``: ``(d,)`` or ``None``.
        activation: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
        scale: ``s``, multiplies the adapter branch.
        residual: ``(..., d)`` added to the branch; defaults to ``x`` (serial adapter). A separate
            tensor is the parallel-adapter placement (``y = sublayer(x) + s·adapter(x)``).

    Returns:
        ``(..., d)``, in the promoted dtype of x and the residual (the activations').

    Weights wider than x (fp32 masters on 16-bit activations): the branch and the add run in fp32,
    y is rounded once, and the weights' gradients are fp32 results.

    Gradients (autograd), with ``z = x·W_downᵀ + b_down`` ``(M, m)``, ``a = act(z)`` and
    ``dz = s·(dy·W_up) ⊙ act'(z)`` ``(M, m)``: ``dW_up = s·dyᵀ·a`` ``(d, m)``, ``db_up = s·Σ_rows dy``
    ``(d,)``, ``dW_down = dzᵀ·x`` ``(m, d)``, ``db_down = Σ_rows dz`` ``(m,)``,
    ``dx = dz·W_down`` (``+ dy`` when the residual is x) ``(M, d)``, ``dresidual = dy``.

    Example:
        >>> x = torch.randn(3, 8)
        >>> wd, wu = torch.randn(4, 8), torch.zeros(8, 4)
        >>> torch.equal(adapter_bottleneck_reference(x, wd, None, wu, None), x)
        True
    """
    act = activation_fn(activation)
    check_adapter_args(x, w_down, b_down, w_up, b_up, residual)
    res = x if residual is None else residual
    if x.dtype == w_down.dtype or torch.is_autocast_enabled(x.device.type):
        out = F.linear(act(F.linear(x, w_down, b_down)), w_up, b_up)
        return torch.add(res, out, alpha=scale)
    # fp32 masters on 16-bit activations: the branch and the add in fp32, y in the activations' dtype
    out = F.linear(act(F.linear(x.to(w_down.dtype), w_down, b_down)), w_up, b_up)
    return torch.add(res, out, alpha=scale).to(torch.promote_types(x.dtype, res.dtype))
