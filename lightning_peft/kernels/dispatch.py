"""Per-call choice between the Triton kernels and the pure-PyTorch path; Triton imported lazily.

The kernels run when all of these hold, otherwise the PyTorch path does (same math, same gradients):

* kernels are enabled: ``use_kernels`` / ``set_kernels_enabled`` decide, and by default the
  environment variable ``LIGHTNING_PEFT_KERNELS`` (``0``/``false``/``off``/``no`` turn them off);
* ``x`` is a CUDA tensor of dtype float16, bfloat16 or float32 and triton imports;
* the sizes are within the kernels' limits (:mod:`.limits`: LoRA rank ``r <= 128``, bottleneck ``m <= 256``).

``torch.compile`` keeps the kernels: they are ``torch.library`` custom ops (``lightning_peft::lora_fused_fwd``,
``lora_fused_bwd``, ``lora_skinny``, ``lora_dy_pass``, ``bottleneck_fwd``, ``bottleneck_bwd``) with fake
functions for shapes and registered autograd, so the compiled graph calls them, without a graph break.

LoRA has three paths (:func:`lora_route`): the fused GEMM of :mod:`.lora` (the rank-r term in the epilogue of
our Triton GEMM), the cuBLAS-backed path of :mod:`.lora_addmm` (skinny Triton kernels for the rank-r terms,
``addmm`` with beta=1 for the big GEMMs; between these two the faster per shape and GPU, timed once,
:mod:`.path_tuning`) and, everywhere else (CPU, float64, kernels off), that same
formulation with PyTorch skinny ops: the rank-r term first, the base GEMM accumulated onto it in place,
x and ``x·Aᵀ`` saved (measured faster on CPU than the autograd reference and HF PEFT's eager formula;
``scripts/bench_lora_cpu.py``). :func:`lora_linear_multi` takes several adapters and mixed batches.
The bottleneck adapter runs its Triton kernels or :func:`.reference.adapter_bottleneck_reference`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .limits import FUSED_MIN_ROWS, KERNEL_DTYPES, MAX_BOTTLENECK, MAX_LORA_RANK
from .lora_addmm import lora_accumulate, lora_linear_addmm  # triton-free: its Triton skinny kernels load on first use
from .path_tuning import choose_path
from .reference import adapter_bottleneck_reference

__all__ = [
    "LoRABranch",
    "adapter_bottleneck",
    "adapter_bottleneck_triton",
    "kernels_enabled",
    "lora_linear",
    "lora_linear_addmm",
    "lora_linear_multi",
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


def will_use_triton(x: Tensor) -> bool:
    """Whether a call on ``x`` goes to the Triton kernels (given sizes within their limits)."""
    return x.is_cuda and x.dtype in KERNEL_DTYPES and kernels_enabled() and triton_available()


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


def lora_route(x: Tensor, lora_a: Tensor, needs_grad: bool, weight: Tensor | None = None,
               bias: Tensor | None = None) -> str:
    """The path of a :func:`lora_linear` call: ``"torch"``, ``"addmm"`` or ``"fused"``.

    * ``"torch"`` (:func:`lora_linear_addmm` with PyTorch skinny ops): :func:`will_use_triton` says no (CPU,
      float64, kernels off, no triton), or ``r > 128``;
    * ``"addmm"`` (cuBLAS for the big GEMMs, Triton skinny kernels): fp32 ``x`` (the fused GEMM would run fp32
      dots off the tensor cores), no gradient needed (``no_grad``/inference, eval, everything frozen), fewer
      than ``FUSED_MIN_ROWS`` rows (decoding), or a GPU other than Hopper (compute capability 9.x);
    * the rest, fp16/bf16 training steps of many rows on Hopper: with ``weight`` given, the faster of
      ``"fused"`` and ``"addmm"`` for this shape and GPU, timed on the first call per shape
      (:func:`.path_tuning.choose_path`; ``LIGHTNING_PEFT_AUTOTUNE=0`` skips the timing); else ``"fused"``.

    ``LIGHTNING_PEFT_LORA_PATH=fused|addmm`` forces a kernel path where the kernels run.
    """
    if not will_use_triton(x) or lora_a.dim() != 2 or lora_a.shape[0] > MAX_LORA_RANK:
        return "torch"
    forced = os.environ.get(PATH_ENV_VAR, "auto").strip().lower()
    if forced in ("fused", "addmm"):
        return forced
    rows = x.numel() // max(1, x.shape[-1])
    capability = _capability(x.device)
    if x.dtype == torch.float32 or not needs_grad or rows < FUSED_MIN_ROWS or capability[0] != 9:
        return "addmm"
    return "fused" if weight is None else choose_path(x, weight, bias, lora_a, capability)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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

    Triton kernels on CUDA, fused or cuBLAS-backed, else the same ordering with PyTorch ops
    (:func:`lora_route` says which); :func:`~lightning_peft.kernels.reference.lora_linear_reference` is the
    spec. Shapes: ``x`` ``(..., K)``, ``weight`` ``(N, K)`` (a transposed view is fine: GPT-2's Conv1D),
    ``bias`` ``(N,)`` or ``None``, ``lora_a`` ``(r, K)``, ``lora_b`` ``(N, r)``; returns ``(..., N)``.
    Gradients: ``dx = dy·W + drop'(dh·A)`` with ``dh = s·dy·B`` ``(M, r)``, ``dA = dhᵀ·drop(x)`` ``(r, K)``,
    ``dB = s·dyᵀ·(drop(x)·Aᵀ)`` ``(N, r)``; ``dW = dyᵀ·x`` and ``dbias = Σ_rows dy`` when the base requires
    grad. ``dropout_p`` applies whenever ``> 0``. Saved for backward: x (and drop(x)) and ``x·Aᵀ`` only.

    Example:
        >>> x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
        >>> a, b = torch.randn(4, 8), torch.randn(6, 4)
        >>> lora_linear(x, w, None, a, b, scale=0.5).shape
        torch.Size([2, 5, 6])
    """
    route = lora_route(x, lora_a, _needs_grad(x, weight, bias, lora_a, lora_b), weight, bias)
    if route == "fused":
        return lora_linear_triton(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    return lora_linear_addmm(x, weight, bias, lora_a, lora_b, scale, dropout_p, ops="triton" if route == "addmm" else "torch")


@dataclass(frozen=True)
class LoRABranch:
    """One adapter's term in :func:`lora_linear_multi`: ``s·(drop(x)·Aᵀ)·Bᵀ + bias`` on the items ``rows``.

    ``lora_a`` ``(r, K)``, ``lora_b`` ``(N, r)``, ``bias`` ``(N,)`` or ``None`` (a trained bias delta),
    ``rows`` ``(b,)`` indices into x's first (batch) dim or ``None`` for the whole batch.
    """

    lora_a: Tensor
    lora_b: Tensor
    scale: float
    dropout_p: float = 0.0
    bias: Tensor | None = None
    rows: Tensor | None = None


def lora_linear_multi(x: Tensor, weight: Tensor, bias: Tensor | None, branches: Sequence[LoRABranch],
                      kernels: bool = True) -> Tensor:
    """A linear layer with several LoRA adapters: ``y = x·Wᵀ + bias + Σ_i (s_i·(drop_i(x)·A_iᵀ)·B_iᵀ + bias_i)[rows_i]``.

    The first whole-batch branch goes through :func:`lora_linear` with the base (its bias folded into the
    base bias), every other one is accumulated onto that output (:func:`.lora_addmm.lora_accumulate`:
    Triton skinny kernels on CUDA, PyTorch ones elsewhere), each saving its ``x·Aᵀ`` and nothing of full size
    but x. Shapes as in :func:`lora_linear`; returns ``(..., N)``. ``kernels=False`` keeps the Triton kernels
    out (the PyTorch path of the same formulation).

    Example:
        >>> x, w = torch.randn(3, 5, 8), torch.randn(6, 8)
        >>> one = LoRABranch(torch.randn(2, 8), torch.randn(6, 2), 0.5)
        >>> two = LoRABranch(torch.randn(4, 8), torch.randn(6, 4), 2.0, rows=torch.tensor([0, 2]))
        >>> lora_linear_multi(x, w, None, [one, two]).shape
        torch.Size([3, 5, 6])
    """
    whole = [br for br in branches if br.rows is None]
    rest = [br for br in branches if br.rows is not None]
    if whole:
        first, rest = whole[0], whole[1:] + rest
        fused_bias = first.bias if bias is None else (bias if first.bias is None else bias + first.bias)
        args = (x, weight, fused_bias, first.lora_a, first.lora_b, first.scale, first.dropout_p)
        y = lora_linear(*args) if kernels else lora_linear_addmm(*args, ops="torch")
    else:
        y = F.linear(x, weight, bias)
    for br in rest:
        ops = "triton" if kernels and lora_route(x, br.lora_a, True) != "torch" else "torch"
        y = lora_accumulate(y, x, br.lora_a, br.lora_b, br.scale, br.dropout_p, br.bias, br.rows, ops=ops)
    return y


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
