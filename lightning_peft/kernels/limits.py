"""What the Triton kernels take, in one place (no triton import): larger sizes run the PyTorch reference."""

from __future__ import annotations

import torch

__all__ = ["KERNEL_DTYPES", "MAX_BOTTLENECK", "MAX_LORA_RANK"]

#: Largest LoRA rank the Triton kernels handle (ranks are padded to a power of two >= 16 inside).
MAX_LORA_RANK = 128

#: Largest bottleneck size m the fused adapter kernels take (the whole ``(rows, m)`` tile stays in registers).
MAX_BOTTLENECK = 256

#: Input dtypes the kernels run in (fp32 accumulation inside for all of them).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
