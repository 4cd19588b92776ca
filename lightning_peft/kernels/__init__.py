"""Triton kernels for LoRA linear layers and bottleneck adapters, with PyTorch references.

``lora_linear`` runs the Triton kernels on CUDA tensors (the fused GEMM or the cuBLAS-backed path, see
``lora_route``) and elsewhere (CPU, float64, or when turned off with ``use_kernels(False)`` /
``LIGHTNING_PEFT_KERNELS=0``) the same ordering in PyTorch: the rank-r term first, the base GEMM accumulated
onto it, x and ``x·Aᵀ`` saved for backward. ``lora_linear_multi`` takes several adapters and mixed batches
(the ``LoRALayer`` entry). ``adapter_bottleneck`` runs its Triton kernels on CUDA and
``adapter_bottleneck_reference`` elsewhere. The ``*_reference`` functions are the spec and the test oracle.
The kernels are ``torch.library`` custom ops, so ``torch.compile`` keeps them in its graphs. Importing this
package does not import triton; the kernel modules (``lora``, ``bottleneck``) load on first use.

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
    LoRABranch,
    adapter_bottleneck,
    adapter_bottleneck_triton,
    kernels_enabled,
    lora_linear,
    lora_linear_addmm,
    lora_linear_multi,
    lora_linear_triton,
    lora_route,
    set_kernels_enabled,
    triton_available,
    use_kernels,
    will_use_triton,
)
from .limits import FUSED_MIN_ROWS, MAX_BOTTLENECK, MAX_LORA_RANK
from .path_tuning import clear_tuned_paths, tuned_paths
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
    "LoRABranch",
    "adapter_bottleneck",
    "adapter_bottleneck_reference",
    "adapter_bottleneck_triton",
    "clear_tuned_paths",
    "kernels_enabled",
    "lora_linear",
    "lora_linear_addmm",
    "lora_linear_multi",
    "lora_linear_reference",
    "lora_linear_triton",
    "lora_route",
    "set_kernels_enabled",
    "triton_available",
    "tuned_paths",
    "use_kernels",
    "will_use_triton",
]
