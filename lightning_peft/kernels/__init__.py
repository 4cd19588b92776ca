"""Fused Triton kernels for LoRA linear layers and bottleneck adapters, with PyTorch references.

``lora_linear`` (fused GEMM or cuBLAS-backed, see ``lora_route``) and ``adapter_bottleneck`` run the Triton kernels on CUDA tensors and the pure
PyTorch ``*_reference`` functions elsewhere (CPU, float64, under ``torch.compile``, or when turned
off with ``use_kernels(False)`` / ``LIGHTNING_PEFT_KERNELS=0``). Importing this package does not
import triton; the kernel modules (``lora``, ``bottleneck``) load on first use.

Example:
    >>> import torch
    >>> from lightning_peft.kernels import lora_linear, use_kernels
    >>> x, w = torch.randn(3, 8), torch.randn(5, 8)
    >>> a, b = torch.randn(2, 8), torch.zeros(5, 2)
    >>> with use_kernels(False):
    ...     y = lora_linear(x, w, None, a, b, scale=2.0)
    >>> y.shape
    torch.Size([3, 5])
"""

from .dispatch import (
    adapter_bottleneck,
    adapter_bottleneck_triton,
    kernels_enabled,
    lora_linear,
    lora_linear_addmm,
    lora_linear_triton,
    lora_route,
    set_kernels_enabled,
    triton_available,
    use_kernels,
    will_use_triton,
)
from .limits import FUSED_MIN_ROWS, MAX_BOTTLENECK, MAX_LORA_RANK
from .reference import (
    ACTIVATIONS,
    adapter_bottleneck_reference,
    lora_linear_reference,
)

__all__ = [
    "ACTIVATIONS",
    "FUSED_MIN_ROWS",
    "MAX_BOTTLENECK",
    "MAX_LORA_RANK",
    "adapter_bottleneck",
    "adapter_bottleneck_reference",
    "adapter_bottleneck_triton",
    "kernels_enabled",
    "lora_linear",
    "lora_linear_addmm",
    "lora_linear_reference",
    "lora_linear_triton",
    "lora_route",
    "set_kernels_enabled",
    "triton_available",
    "use_kernels",
    "will_use_triton",
]
