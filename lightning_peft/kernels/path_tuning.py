"""Per-shape choice between the fused LoRA GEMM and the cuBLAS-backed path, timed once per key.

Where :func:`~lightning_peft.kernels.dispatch.lora_route`'s fixed rules say ``"fused"`` (fp16/bf16 training
steps of at least ``FUSED_MIN_ROWS`` rows on Hopper), :func:`choose_path` times forward + backward of both
paths on fresh tensors of the call's shape (:func:`time_paths`: CUDA events, one warm-up call that also runs
the kernels' own autotuning, then the median of a few calls), keeps the faster one in an in-process table and
returns it for every later call with the same :class:`PathKey`: GPU capability, dtype, row count bucketed as
the kernels' autotune keys (:func:`~lightning_peft.kernels.limits.m_bucket`), ``N``, ``K``, ``r``, bias or
not, base trainable or not, and the weight's layout (a transposed view, GPT-2's Conv1D, is another GEMM).

No timing happens under ``LIGHTNING_PEFT_AUTOTUNE=0`` (the rule: ``"fused"``), while ``torch.compile`` traces
or a CUDA graph captures (the table's choice if there is one, else the rule), or on CPU tensors. The timing
runs on its own tensors, with autocast off and its own saved-tensor hooks, and takes gradients with
``torch.autograd.grad``, so the caller's autograd graph, ``.grad`` fields, checkpointing hooks and RNG
streams are untouched. ``LIGHTNING_PEFT_LORA_PATH=fused|addmm`` forces a path before this module is asked.

Example:
    >>> clear_tuned_paths()
    >>> tuned_paths()
    {}
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .limits import autotune_enabled, m_bucket
from .reference import device_guard, no_autocast

__all__ = [
    "PathChoice", "PathKey", "choose_path", "clear_tuned_paths", "cuda_median_ms", "path_key", "time_paths", "tuned_paths",
]

#: Timed calls per path after one warm-up (the median is kept).
REPS = 5


class PathKey(NamedTuple):
    """What a tuned choice is keyed by (one entry per distinct key)."""

    capability: tuple[int, int]
    dtype: torch.dtype
    m_bucket: int
    n: int
    k: int
    r: int
    bias: bool
    base_trainable: bool
    weight_transposed: bool


class PathChoice(NamedTuple):
    """A table entry: the chosen path and the measured forward+backward milliseconds per path (empty: not timed)."""

    path: str
    times_ms: dict[str, float]


_TABLE: dict[PathKey, PathChoice] = {}


def path_key(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, capability: tuple[int, int]) -> PathKey:
    """The table key of a :func:`~lightning_peft.kernels.lora_linear` call (``x`` ``(..., K)``, ``weight`` ``(N, K)``)."""
    rows = x.numel() // max(1, x.shape[-1])
    base_trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    return PathKey(tuple(capability), x.dtype, m_bucket(rows), int(weight.shape[0]), int(x.shape[-1]),
                   int(lora_a.shape[0]), bias is not None, bool(base_trainable), weight.stride(-1) != 1)


def tuned_paths() -> dict[PathKey, PathChoice]:
    """A copy of the table (for tests and benchmarks)."""
    return dict(_TABLE)


def clear_tuned_paths() -> None:
    """Forget every tuned choice (the next call per key times again)."""
    _TABLE.clear()


def cuda_median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls (CUDA events), after one warm-up call that compiles and
    autotunes the kernels of this path for the shape."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_paths(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, reps: int = REPS,
               timer: Callable[[Callable[[], object], int], float] = cuda_median_ms) -> dict[str, float]:
    """Milliseconds of forward + backward per path (``"fused"``, ``"addmm"``) on fresh tensors shaped as the call.

    Gradients for x and the adapter, and for the base when it trains. Returns ``{}`` (no timing) for non-CUDA
    tensors with the default ``timer`` (the tests pass a CPU one) or when the tensors do not fit in GPU memory.
    """
    if not x.is_cuda and timer is cuda_median_ms:
        return {}
    from .dispatch import lora_linear_addmm, lora_linear_triton  # dispatch imports this module

    M, K, N, r = x.numel() // max(1, x.shape[-1]), x.shape[-1], weight.shape[0], lora_a.shape[0]
    dev, dt = x.device, x.dtype
    gen = torch.Generator(device=dev).manual_seed(0)  # the caller's RNG streams stay as they were

    def randn(*shape: int, dtype: torch.dtype = dt, std: float = 1.0) -> Tensor:
        return torch.empty(*shape, device=dev, dtype=dtype).normal_(0.0, std, generator=gen)

    base_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    try:
        with device_guard(x), no_autocast(x), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            xs = randn(M, K).requires_grad_()
            w = randn(K, N, std=K ** -0.5).t() if weight.stride(-1) != 1 else randn(N, K, std=K ** -0.5)
            w.requires_grad_(base_grad)
            b = None if bias is None else randn(N).requires_grad_(base_grad)
            a = randn(r, K, dtype=lora_a.dtype, std=K ** -0.5).requires_grad_()
            bb = randn(N, r, dtype=lora_a.dtype, std=0.01).requires_grad_()
            dy = randn(M, N)
            inputs = [t for t in (xs, w, b, a, bb) if t is not None and t.requires_grad]
            paths = {"fused": lambda: lora_linear_triton(xs, w, b, a, bb, 1.0),
                     "addmm": lambda: lora_linear_addmm(xs, w, b, a, bb, 1.0, ops="triton")}
            return {name: timer(lambda f=f: torch.autograd.grad(f(), inputs, dy), reps) for name, f in paths.items()}
    except torch.cuda.OutOfMemoryError:
        return {}


def choose_path(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, capability: tuple[int, int]) -> str:
    """``"fused"`` or ``"addmm"`` for a call the fixed rules would send to the fused GEMM (see the module docstring).

    Times both paths on the first call per :class:`PathKey` and returns the table's choice afterwards.
    """
    if not autotune_enabled():
        return "fused"
    compiling = torch.compiler.is_compiling()
    if compiling and not all(isinstance(d, int) for d in (*x.shape, *weight.shape, *lora_a.shape)):
        return "fused"  # dynamic shapes: bucketing a symbolic M would specialize it
    key = path_key(x, weight, bias, lora_a, capability)
    choice = _TABLE.get(key)
    if choice is not None:
        return choice.path
    if compiling or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return "fused"  # never time while tracing or capturing: the rule until an eager call has timed this key
    times = time_paths(x, weight, bias, lora_a)
    path = min(times, key=times.__getitem__) if times else "fused"
    _TABLE[key] = PathChoice(path, times)
    return path
