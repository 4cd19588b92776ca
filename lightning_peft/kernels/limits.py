"""What the Triton kernels take, in one place (no triton import): larger sizes run the PyTorch reference."""

from __future__ import annotations

import torch

__all__ = ["FUSED_MIN_ROWS", "KERNEL_DTYPES", "MAX_BOTTLENECK", "MAX_LORA_RANK"]

#: Largest LoRA rank the Triton kernels handle (ranks are padded to a power of two >= 16 inside).
MAX_LORA_RANK = 128

#: Largest bottleneck size m the fused adapter kernels take (the whole ``(rows, m)`` tile stays in registers).
MAX_BOTTLENECK = 256

#: Input dtypes the kernels run in (fp32 accumulation inside for all of them).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Fewest rows (tokens) for which ``lora_linear`` takes the fused GEMM; below, the cuBLAS-backed path runs
#: (decoding: the GEMM is bound by reading W, cuBLAS's small-M kernels do that best, 128-row tiles would be padding).
FUSED_MIN_ROWS = 512
