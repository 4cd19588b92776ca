"""Per-call choice between the Triton kernels and the PyTorch reference; Triton imported lazily.

The kernels run when all of these hold, otherwise the reference does (same math, same gradients):

* kernels are enabled: ``use_kernels`` / ``set_kernels_enabled`` decide, and by default the
  environment variable ``LIGHTNING_PEFT_KERNELS`` (``0``/``false``/``off``/``no`` turn them off);
* ``x`` is a CUDA tensor of dtype float16, bfloat16 or float32 and triton imports;
* the call is not being traced by ``torch.compile`` (the compiler then sees plain PyTorch);
* the sizes are within the kernels' limits (:mod:`.limits`: LoRA rank ``r <= 128``, bottleneck ``m <= 256``).

LoRA then has two kernel paths (:func:`lora_route`): the fused GEMM of :mod:`.lora` (the rank-r term
in the epilogue of our Triton GEMM) and the cuBLAS-backed path of :mod:`.lora_addmm` (skinny Triton
kernels for the rank-r terms, ``addmm`` with beta=1 for the big GEMMs).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from .limits import FUSED_MIN_ROWS, KERNEL_DTYPES, MAX_BOTTLENECK, MAX_LORA_RANK
from .lora_addmm import lora_linear_addmm  # triton-free: its Triton skinny kernels load on first use
from .reference import adapter_bottleneck_reference, lora_linear_reference

__all__ = [
    "adapter_bottleneck",
    "adapter_bottleneck_triton",
    "kernels_enabled",
    "lora_linear",
    "lora_linear_addmm",
    "lora_linear_triton",
    "lora_route",
    "set_kernels_enabled",
    "triton_available",
    "use_kernels",
    "will_use_triton",
]

ENV_VAR = "LIGHTNING_PEFT_KERNELS"
_OFF = {"0", "false", "off", "no"}

#: ``fused`` or ``addmm`` forces that LoRA kernel path wherever the kernels run (benchmarks); unset or
#: ``auto``: :func:`lora_route`'s rules.
PATH_ENV_VAR = "LIGHTNING_PEFT_LORA_PATH"

_override: bool | None = None  # set by use_kernels / set_kernels_enabled; None: the env var decides


def kernels_enabled() -> bool:
    """Whether the Triton kernels may be used (they still need CUDA tensors and triton).

    ``use_kernels`` / ``set_kernels_enabled`` take precedence; otherwise ``LIGHTNING_PEFT_KERNELS``
    (read on every call) decides, enabled when unset.
    """
    if _override is not None:
        return _override
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def set_kernels_enabled(enabled: bool | None) -> bool | None:
    """Turn the kernels on/off for the process (``None``: back to the env var); returns the previous setting."""
    global _override
    previous, _override = _override, None if enabled is None else bool(enabled)
    return previous


@contextlib.contextmanager
def use_kernels(enabled: bool = True) -> Iterator[None]:
    """Context manager turning the kernels on or off, restoring the previous setting on exit.

    Example:
        >>> with use_kernels(False):
        ...     kernels_enabled()
        False
    """
    previous = set_kernels_enabled(enabled)
    try:
        yield
    finally:
        set_kernels_enabled(previous)


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once, by importing it on first call)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except Exception:
        return False
    return True


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def will_use_triton(x: Tensor) -> bool:
    """Whether a call on ``x`` goes to the Triton kernels (given sizes within their limits)."""
    return (
        x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and kernels_enabled()
        and not _compiling()
        and triton_available()
    )


def lora_linear_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """:func:`lora_linear` always through the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Imports triton on first use. Raises ValueError for bad shapes or ``r > 128``, TypeError for
    unsupported or mixed dtypes, RuntimeError for CPU tensors without the interpreter.
    """
    from .lora import lora_linear_triton as fn

    return fn(x, weight, bias, lora_a, lora_b, scale, dropout_p)


def adapter_bottleneck_triton(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """:func:`adapter_bottleneck` always through the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Imports triton on first use. Raises ValueError for bad shapes, an unknown activation or
    ``m > 256``, TypeError for unsupported or mixed dtypes.
    """
    from .bottleneck import adapter_bottleneck_triton as fn

    return fn(x, w_down, b_down, w_up, b_up, activation, scale, residual)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def lora_route(x: Tensor, lora_a: Tensor, needs_grad: bool) -> str:
    """The path of a :func:`lora_linear` call: ``"reference"``, ``"addmm"`` or ``"fused"``.

    * ``"reference"``: :func:`will_use_triton` says no (CPU, float64, kernels off, compiling, no
      triton), or ``r > 128``;
    * ``"addmm"`` (cuBLAS for the big GEMMs): fp32 ``x`` (the fused GEMM would run fp32 dots off the
      tensor cores), no gradient needed (``no_grad``/inference, eval, everything frozen), fewer than
      ``FUSED_MIN_ROWS`` rows (decoding), or a GPU other than Hopper (compute capability 9.x);
    * ``"fused"``: the rest, fp16/bf16 training steps of many rows on Hopper.

    ``LIGHTNING_PEFT_LORA_PATH=fused|addmm`` forces a kernel path where the kernels run.
    """
    if not will_use_triton(x) or lora_a.dim() != 2 or lora_a.shape[0] > MAX_LORA_RANK:
        return "reference"
    forced = os.environ.get(PATH_ENV_VAR, "auto").strip().lower()
    if forced in ("fused", "addmm"):
        return forced
    rows = x.numel() // max(1, x.shape[-1])
    if x.dtype == torch.float32 or not needs_grad or rows < FUSED_MIN_ROWS or _capability(x.device)[0] != 9:
        return "addmm"
    return "fused"


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """LoRA linear ``y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ``, differentiable in every tensor argument.

    Triton kernels on CUDA, fused or cuBLAS-backed (:func:`lora_route` says which), else
    :func:`~lightning_peft.kernels.reference.lora_linear_reference`. Shapes: ``x`` ``(..., K)``,
    ``weight`` ``(N, K)``, ``bias`` ``(N,)`` or ``None``, ``lora_a`` ``(r, K)``, ``lora_b`` ``(N, r)``;
    returns ``(..., N)``. Gradients: ``dx = dy·W + drop'(dh·A)`` with ``dh = s·dy·B`` ``(M, r)``,
    ``dA = dhᵀ·drop(x)`` ``(r, K)``, ``dB = s·dyᵀ·(drop(x)·Aᵀ)`` ``(N, r)``; ``dW = dyᵀ·x`` and
    ``dbias = Σ_rows dy`` when the base requires grad. ``dropout_p`` applies whenever ``> 0``.

    Example:
        >>> x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
        >>> a, b = torch.randn(4, 8), torch.randn(6, 4)
        >>> lora_linear(x, w, None, a, b, scale=0.5).shape
        torch.Size([2, 5, 6])
    """
    tensors = (x, weight, bias, lora_a, lora_b)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    route = lora_route(x, lora_a, needs_grad)
    if route == "fused":
        return lora_linear_triton(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    if route == "addmm":
        return lora_linear_addmm(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p)


def adapter_bottleneck(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """Bottleneck adapter ``y = residual + s·(act(x·W_downᵀ + b_down)·W_upᵀ + b_up)``, differentiable.

    Fused Triton kernels on CUDA (see the module docstring for when), else
    :func:`~lightning_peft.kernels.reference.adapter_bottleneck_reference`. Shapes: ``x`` ``(..., d)``,
    ``w_down`` ``(m, d)``, ``b_down`` ``(m,)``, ``w_up`` ``(d, m)``, ``b_up`` ``(d,)`` (biases may be
    ``None``), ``residual`` like ``x`` or ``None`` (then ``x``). Activations: ``gelu`` (erf),
    ``gelu_tanh``, ``relu``, ``silu``. With ``z = x·W_downᵀ + b_down``, ``a = act(z)``,
    ``dz = s·(dy·W_up) ⊙ act'(z)``: ``dW_up = s·dyᵀ·a`` ``(d, m)``, ``db_up = s·Σ dy``,
    ``dW_down = dzᵀ·x`` ``(m, d)``, ``db_down = Σ dz``, ``dx = dz·W_down (+ dy if residual is x)``,
    ``dresidual = dy``.

    Example:
        >>> x = torch.randn(2, 5, 8)
        >>> adapter_bottleneck(x, torch.randn(4, 8), None, torch.zeros(8, 4), None).shape
        torch.Size([2, 5, 8])
    """
    if will_use_triton(x) and w_down.dim() == 2 and w_down.shape[0] <= MAX_BOTTLENECK:
        return adapter_bottleneck_triton(x, w_down, b_down, w_up, b_up, activation, scale, residual)
    return adapter_bottleneck_reference(x, w_down, b_down, w_up, b_up, activation, scale, residual)
