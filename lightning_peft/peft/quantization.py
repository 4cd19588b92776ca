"""Quantized frozen bases for QLoRA: NF4 / FP4 (4-bit, block-wise absmax, optional double quantization) and int8.

Built on bitsandbytes (``Linear4bit`` / ``Linear8bitLt``), chosen over torchao's NF4 tensor and over
Triton kernels of our own because:

- models loaded by ``transformers`` with a ``BitsAndBytesConfig`` already consist of exactly these
  layers, so quantizing a base here and loading a quantized checkpoint there give one code path
  (LoRA wraps either, merge/dequantize handle either);
- its CUDA kernels (NF4 dequantization, 4-bit inference GEMV, LLM.int8 with outlier decomposition)
  are maintained across GPU generations, and QLoRA training is dequantize-then-GEMM anyway, where a
  home-made fused kernel would buy little over its dequantize + cuBLAS;
- since 0.46 it runs on CPU (0.50.2 here: quantize, forward, backward), so the tests exercise the
  same layers as GPU runs; torchao's NF4 moved between modules across releases and pins torch versions.

It is an optional dependency (``pip install lightning_peft[qlora]``); only this module imports it.
Weights are quantized from the layer's own dtype on its own device; adapters on top train in fp32
(or the base's compute dtype). Merging adapters into quantized weights is refused: see
:func:`merge_and_dequantize`, which merges in bf16 (or another float dtype) and re-quantizes only when
asked, reporting what that costs (peft #2321, #1043, #2105).
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..groups.matching import format_names
from .layer import AdapterLayer
from .surgery import replace_module

__all__ = [
    "MergeReport",
    "QuantMemory",
    "QuantSpec",
    "base_weight_memory",
    "dequantize_model",
    "dequantized_weight",
    "is_quantized",
    "keep_layout",
    "merge_and_dequantize",
    "quantize_linear",
    "quantize_modules",
    "quantized_merge_blocker",
    "require_bitsandbytes",
]

log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def require_bitsandbytes() -> Any:
    """Import bitsandbytes, or fail with how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "QLoRA needs bitsandbytes (>= 0.46 for CPU support): pip install 'lightning_peft[qlora]' or pip install bitsandbytes"
        ) from err
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer (never imports bitsandbytes)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt))


def quantized_merge_blocker(base: nn.Module) -> str | None:
    """Why adapters cannot be merged into ``base`` when it is quantized (``None`` otherwise)."""
    if not is_quantized(base):
        return None
    return (
        f"its base is a quantized {type(base).__name__}: merged weights would be re-rounded to the quantization grid "
        "and lose much of the update. Use merge_and_dequantize(model) (bf16 result; requantize=QuantSpec(...) to "
        "quantize again and see the cost), or keep the adapters unmerged"
    )


@dataclass(frozen=True)
class QuantSpec:
    """How to store frozen linear weights.

    Args:
        bits: 4 (NF4/FP4, block-wise absmax) or 8 (int8 row-wise absmax, LLM.int8).
        quant_type: ``"nf4"`` (normal-float, QLoRA's) or ``"fp4"``, for 4 bits.
        double_quant: quantize the fp32 absmax scales too (8-bit, blocks of 256): ~0.37 bit/weight saved.
        block_size: weights per absmax scale, for 4 bits (64 as in QLoRA).
        compute_dtype: dtype of the matmul: ``"auto"`` (the layer's dtype before quantization),
            ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        int8_threshold: LLM.int8 outlier threshold for 8 bits (0 turns the mixed-precision decomposition off).
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    block_size: int = 64
    compute_dtype: str = "auto"
    int8_threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype not in ("auto", *_DTYPES):
            raise ValueError(f"compute_dtype must be one of {['auto', *_DTYPES]}, got {self.compute_dtype!r}")
        if self.block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"block_size must be a power of two from 32 to 4096, got {self.block_size}")


def quantize_linear(linear: nn.Linear, spec: QuantSpec) -> nn.Module:
    """A frozen bitsandbytes copy of ``linear`` (same device), quantized per ``spec``."""
    bnb = require_bitsandbytes()
    weight, bias = linear.weight.detach(), linear.bias.detach() if linear.bias is not None else None
    device = weight.device
    if spec.bits == 4:
        compute = weight.dtype if spec.compute_dtype == "auto" else _DTYPES[spec.compute_dtype]
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=compute,
            compress_statistics=spec.double_quant, quant_type=spec.quant_type, device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.clone(), requires_grad=False, compress_statistics=spec.double_quant, quant_type=spec.quant_type,
            blocksize=spec.block_size,
        )
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=spec.int8_threshold, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    layer = layer.to(device)  # bitsandbytes quantizes when the parameter is moved to its device
    layer.train(linear.training)
    keep_layout(layer)
    return layer


def keep_layout(layer: nn.Module) -> None:
    """Manage a bitsandbytes layer: pin its storage layout and let ``load_state_dict`` take its own quantization state.

    - bitsandbytes' CPU inference path repacks 4-bit weights in place on the first no-grad eval forward
      (and fails for layers narrower than a block): saving, merging and checks need the layout as quantized.
    - A quantized ``Linear4bit`` saves its quantization state (``weight.absmax``, ``weight.quant_map``...)
      but cannot load it back: a pre-hook checks those entries against the layer's own (a frozen base
      keeps them) and consumes them, so checkpoints of QLoRA runs resume with strict loading.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    if is_quantized(layer) and not getattr(layer, "_lightning_peft_managed", False):
        layer.register_load_state_dict_pre_hook(_consume_quant_state)
        layer._lightning_peft_managed = True


def _consume_quant_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                         missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return
    for key, value in state.as_dict(packed=True).items():
        full = f"{prefix}weight.{key}"
        if full in state_dict:
            incoming = state_dict.pop(full)
            if not torch.equal(incoming.detach().cpu(), value.detach().cpu()):
                error_msgs.append(f"{full}: the checkpoint was quantized differently from this layer (another base or QuantSpec)")


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) float weight a quantized layer computes with."""
    if not is_quantized(module):
        return module.weight.detach().to(dtype)
    import bitsandbytes.functional as F

    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:  # 4-bit
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by bitsandbytes' CPU inference path
            data, state = F._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return F.dequantize_4bit(data, state).to(dtype)
    if getattr(weight, "SCB", None) is not None:  # 8-bit, quantized
        return (weight.data.float() * weight.SCB.float().view(-1, 1) / 127.0).to(dtype)
    return weight.data.to(dtype)  # 8-bit not yet moved to its device: still float


def _storage_bytes(module: nn.Module) -> int:
    weight = module.weight
    total = weight.data.numel() * weight.data.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:  # the scales; the 16- and 256-entry code tables are shared constants, not counted
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the scales' offset
    scb = getattr(weight, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    return total


@dataclass(frozen=True)
class QuantMemory:
    """Storage of the linear weights that are quantized, against the same weights in bf16."""

    layers: int
    parameters: int
    quantized_bytes: int
    bits: tuple[int, ...] = field(default_factory=tuple)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.parameters

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.bf16_bytes if self.parameters else 1.0

    def __str__(self) -> str:
        bits = "/".join(f"{b}-bit" for b in self.bits) or "no"
        return (
            f"{bits} base: {self.layers} linear layers, {self.parameters:,} weights: {self.bf16_bytes / 2**20:.1f} MiB in bf16 -> "
            f"{self.quantized_bytes / 2**20:.1f} MiB quantized ({self.ratio:.2f}x)"
        )


def base_weight_memory(model: nn.Module) -> QuantMemory:
    """What the quantized linear weights of ``model`` take, and what they would take in bf16."""
    layers = [m for m in model.modules() if is_quantized(m)]
    bits = tuple(sorted({4 if getattr(m.weight, "quant_state", None) is not None or type(m).__name__ == "Linear4bit" else 8 for m in layers}))
    return QuantMemory(
        layers=len(layers),
        parameters=sum(m.in_features * m.out_features for m in layers),
        quantized_bytes=sum(_storage_bytes(m) for m in layers),
        bits=bits,
    )


def quantize_modules(model: nn.Module, names: Sequence[str], spec: QuantSpec) -> list[str]:
    """Quantize the ``nn.Linear`` layers named (inside a wrapper: its base layer) in place; returns those changed."""
    require_bitsandbytes()
    changed = []
    for name in names:
        module = model.get_submodule(name)
        holder, target = (module, "base_layer") if isinstance(module, AdapterLayer) else (None, name)
        linear = module.base_layer if holder is not None else module
        if is_quantized(linear):
            keep_layout(linear)  # quantized by transformers' BitsAndBytesConfig: kept, layout pinned
            continue
        if type(linear) is not nn.Linear:
            raise ValueError(f"{name!r} is a {type(linear).__name__}; only nn.Linear layers are quantized")
        quantized = quantize_linear(linear, spec)
        if holder is not None:
            holder.base_layer = quantized
        else:
            replace_module(model, target, quantized)
        changed.append(name)
    return changed


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace every quantized layer (also under adapters) by an ``nn.Linear`` of ``dtype``; returns their names."""
    changed = []
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=module.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dequantized_weight(module, dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        linear.requires_grad_(False).train(module.training)
        replace_module(model, name, linear)
        changed.append(name)
    return changed


@dataclass
class MergeReport:
    """What :func:`merge_and_dequantize` did: the layers it dequantized, and what re-quantizing cost."""

    model: nn.Module
    dtype: torch.dtype
    dequantized: list[str]
    requantized: bool = False
    weight_error: float | None = None  # relative Frobenius error of the re-quantized merged weights
    output_difference: float | None = None  # max |output| change caused by re-quantizing, on the given inputs


def merge_and_dequantize(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    requantize: QuantSpec | None = None,
    example_inputs: Any = None,
) -> MergeReport:
    """Dequantize the base to ``dtype``, fold the active adapters in and drop the wrappers.

    The result is a plain model in ``dtype`` with the same outputs as base + adapters (up to ``dtype``
    rounding). Folding adapters into 4-bit weights would re-round them to the NF4 grid and lose much
    of what the adapters learned, so that only happens when ``requantize`` is given: the merged
    weights are quantized again and the report gives the relative weight error and, with
    ``example_inputs`` (a tensor or a dict of keyword arguments), the largest output change it causes.
    """
    from .functional import merge_and_unload, merge_refusal  # functional imports this module's is_quantized

    if (refusal := merge_refusal(model, dequantized=True)) is not None:  # before dequantizing anything
        raise RuntimeError(refusal)
    quantized_sites = [n for n, m in model.named_modules() if is_quantized(m)]
    dequantized = dequantize_model(model, dtype)
    merge_and_unload(model)
    log.warning(
        "merge_and_dequantize: %d quantized layers now hold %s weights with the adapters folded in; they are not quantized "
        "(re-quantizing merged weights loses precision). %s",
        len(dequantized), str(dtype).replace("torch.", ""),
        "Re-quantizing as asked." if requantize is not None else "Pass requantize=QuantSpec(...) to quantize them again.",
    )
    report = MergeReport(model, dtype, dequantized)
    if requantize is None:
        return report
    names = [n.removesuffix(".base_layer") for n in quantized_sites]
    before = _outputs(model, example_inputs)
    originals = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    quantize_modules(model, names, requantize)
    num = sum(float((dequantized_weight(model.get_submodule(n)) - w).square().sum()) for n, w in originals.items())
    den = sum(float(w.square().sum()) for w in originals.values())
    report.requantized, report.weight_error = True, (num / den) ** 0.5 if den else 0.0
    after = _outputs(model, example_inputs)
    if before is not None:
        report.output_difference = float((after.float() - before.float()).abs().max())
    log.warning(
        "merge_and_dequantize: re-quantized %s; relative weight error %.3g%s", format_names(names, 5), report.weight_error,
        f", max output change {report.output_difference:.3g}" if report.output_difference is not None else "",
    )
    return report


def _outputs(model: nn.Module, inputs: Any) -> torch.Tensor | None:
    if inputs is None:
        return None
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", out)
