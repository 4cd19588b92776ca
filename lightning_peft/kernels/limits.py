"""What the Triton kernels take, in one place (no triton import): larger sizes run the PyTorch reference."""

from __future__ import annotations

import os

import torch

__all__ = [
    "AUTOTUNE_ENV_VAR", "FUSED_MIN_ROWS", "KERNEL_DTYPES", "MAX_BOTTLENECK", "MAX_LORA_RANK", "autotune_enabled", "m_bucket",
]

#: Largest LoRA rank the Triton kernels handle (ranks are padded to a power of two >= 16 inside).
MAX_LORA_RANK = 128

#: Largest bottleneck size m the fused adapter kernels take (the whole ``(rows, m)`` tile stays in registers).
MAX_BOTTLENECK = 256

#: Input dtypes the kernels run in (fp32 accumulation inside for all of them).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Fewest rows (tokens) for which ``lora_linear`` takes the fused GEMM; below, the cuBLAS-backed path runs
#: (decoding: the GEMM is bound by reading W, cuBLAS's small-M kernels do that best, 128-row tiles would be padding).
FUSED_MIN_ROWS = 512

#: ``LIGHTNING_PEFT_AUTOTUNE=0`` launches every kernel with its first config instead of timing them all on the
#: first call per shape (the tests set it: correctness does not need the fastest one), and keeps the LoRA path
#: on :func:`~lightning_peft.kernels.dispatch.lora_route`'s fixed rule instead of timing both paths.
AUTOTUNE_ENV_VAR = "LIGHTNING_PEFT_AUTOTUNE"


def autotune_enabled() -> bool:
    """Whether ``LIGHTNING_PEFT_AUTOTUNE`` allows timing (read on every call; ``0``/``false``/``off``/``no`` turn it off)."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def m_bucket(m: int) -> int:
    """The autotune key for a row count (tokens): the next power of two (at least 128), so padded batches
    of varying length share one tuned config per bucket instead of re-tuning for every new length.

    Example:
        >>> [m_bucket(m) for m in (1, 128, 129, 3000)]
        [128, 128, 256, 4096]
    """
    return max(128, 1 << (int(m) - 1).bit_length())
