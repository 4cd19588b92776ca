"""Helpers shared by the Triton kernel modules (imports triton; import only lazily).

Precision scheme used by every kernel (fp32 accumulation throughout):

* 16-bit inputs (fp16/bf16): every ``tl.dot`` takes 16-bit operands — fp32 intermediates such as
  ``x·Aᵀ`` or ``dz`` are rounded to the input dtype first, as PyTorch's own 16-bit autograd does —
  and accumulates in fp32.
* fp32 inputs: fp32 operands; TF32 is used only when ``torch.backends.cuda.matmul.allow_tf32``
  is set, as for ``F.linear``.
* fp32 adapter masters on 16-bit inputs (``check_dtypes(..., masters=...)``): their operands are
  rounded to the input dtype like everything else, and their gradients are the fp32 sums, stored fp32.
* float64 (interpreter only, for ``gradcheck``): float64 everywhere.
* Under ``TRITON_INTERPRET=1`` bf16 arithmetic is broken, so bf16 operands are rounded to bf16 and
  then widened to fp32 before the dot (the same products and fp32 sums as a bf16 MMA).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .limits import AUTOTUNE_ENV_VAR, autotune_enabled, m_bucket  # noqa: F401  (re-exported for the kernel modules)
from .reference import autocast_cast, device_guard  # noqa: F401  (re-exported for the kernel modules)

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    """Compile-time precision flags for one call (see the module docstring)."""

    low_prec: bool  # round dot operands to the 16-bit input dtype
    upcast: bool  # widen dot operands to fp32 (interpreter bf16)
    acc: object  # tl.float32 or tl.float64
    acc_torch: torch.dtype  # the same as a torch dtype, for intermediates kept between kernels
    input_precision: str  # "tf32" or "ieee" for fp32 dots


def precision_for(dtype: torch.dtype) -> Precision:
    low = dtype in (torch.float16, torch.bfloat16)
    if dtype == torch.float64:
        return Precision(False, False, tl.float64, torch.float64, "ieee")
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return Precision(
        low_prec=low,
        upcast=INTERPRET and dtype == torch.bfloat16,
        acc=tl.float32,
        acc_torch=torch.float32,
        input_precision="tf32" if (low or allow_tf32) else "ieee",
    )


def check_dtypes(name_tensors: dict, device: torch.device, masters: tuple[str, ...] = ()) -> torch.dtype:
    """All tensors share one supported dtype and ``device``; returns the dtype.

    The tensors named in ``masters`` may instead be float32 when that dtype is fp16/bf16 (fp32
    adapter masters: the kernels round their operands to the 16-bit dtype, accumulate in fp32 and
    return their gradients in fp32).
    """
    first_name, first = next(iter(name_tensors.items()))
    dtype = first.dtype
    allowed = _SUPPORTED + ((torch.float64,) if INTERPRET else ())
    if dtype not in allowed:
        raise TypeError(
            f"{first_name} has dtype {dtype}; the Triton kernels take {[str(d) for d in allowed]} "
            "(use the *_reference function for other dtypes)"
        )
    for name, t in name_tensors.items():
        if t is None:
            continue
        if t.dtype != dtype and not (name in masters and t.dtype == torch.float32 and dtype in _HALF):
            raise TypeError(
                f"dtype mismatch: {first_name} is {dtype} but {name} is {t.dtype}; cast them to one "
                "dtype or run under torch.autocast"
            )
        if t.device != device:
            raise ValueError(f"device mismatch: {first_name} is on {device} but {name} is on {t.device}")
    return dtype


def check_device(t: torch.Tensor) -> None:
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 before "
            "importing triton to run them on CPU, or call the *_reference function"
        )


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune`` hook of every autotuned kernel: all configs, or the first one when
    ``LIGHTNING_PEFT_AUTOTUNE`` is ``0`` (read on every call that would autotune)."""
    return configs if autotune_enabled() else configs[:1]


@contextmanager
def pinned_config(kernel: Any, config: triton.Config) -> Iterator[None]:
    """Launch the autotuned ``kernel`` with ``config`` alone inside the block (its meta-parameters, no timing), then give
    its own configs and tuning cache back: how the tests run every config a GPU would tune over, one at a time, and
    how the interpreter (where autotuning over several configs fails) runs the GPU configs at all."""
    configs, cache = kernel.configs, dict(kernel.cache)
    kernel.configs = [config]
    kernel.cache.clear()
    try:
        yield
    finally:
        kernel.configs = configs
        kernel.cache.clear()
        kernel.cache.update(cache)


def distinct_configs(configs: Sequence[triton.Config]) -> list[triton.Config]:
    """``configs`` without repeats of the same meta-parameters (block sizes): the interpreter ignores warps and stages."""
    seen: set[tuple] = set()
    out = []
    for c in configs:
        key = tuple(sorted(c.kwargs.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


@triton.jit
def prep_operand(t, DT: tl.constexpr, ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded tile made ready for ``tl.dot`` (see the module docstring)."""
    if LOW_PREC:
        t = t.to(DT)
    else:
        t = t.to(ACC)
    if UPCAST:
        t = t.to(tl.float32)
    return t
