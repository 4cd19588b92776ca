"""QLoRA (Dettmers et al. 2023): LoRA adapters on a frozen base whose linear weights are stored in 4 or 8 bits.

``inject(model, QLoRAConfig(...))`` first quantizes the frozen linear layers of the pretrained
backbone (``quantize_modules``, default every linear layer but the head; layers a ``transformers``
``BitsAndBytesConfig`` already quantized are kept as they are), then wraps the LoRA targets as
:class:`~lightning_peft.LoRAConfig` does. Adapters are ordinary LoRA adapters: they save, load
(onto a freshly quantized base), switch and export to PEFT's layout like any other; merging is
refused (see :func:`~lightning_peft.peft.quantization.merge_and_dequantize`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..utils.names import is_inside_any
from .lora import LORA_DEFAULT_TARGETS, LoRAConfig, lora_kind, plan_lora
from .quantization import (
    QuantSpec,
    is_quantized,
    quantize_modules,
    require_bitsandbytes,
)
from .registry import register_method
from .targeting import (
    all_linear_modules,
    base_module,
    candidate_modules,
    resolve_targets,
    select_modules,
)

__all__ = ["QLoRAConfig"]


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA options plus how the frozen base is stored.

    Args:
        bits: 4 (NF4/FP4 with block-wise absmax scales) or 8 (int8, LLM.int8).
        quant_type: ``"nf4"`` or ``"fp4"`` (4 bits).
        double_quant: quantize the absmax scales too (8-bit, blocks of 256).
        block_size: weights per absmax scale (4 bits; 64 as in QLoRA).
        compute_dtype: ``"auto"`` (each layer's dtype before quantization), ``"bfloat16"``, ``"float16"``, ``"float32"``.
        int8_threshold: LLM.int8 outlier threshold (8 bits).
        quantize_modules: ``"all-linear"`` (every linear layer of the backbone, not the head) or module patterns.
        init: also ``"loftq"`` (PEFT's ``init_lora_weights="loftq"``): the LoRA targets are quantized together with
            their A, B so that Q + s·B·A is closer to the float weight than plain QLoRA's Q (see
            :func:`~lightning_peft.peft.lora_init.loftq`); loading the adapter re-derives Q from the float model.
        loftq_iter: LoftQ's alternating quantize / SVD steps (PEFT's ``loftq_iter``).
        Everything else: see :class:`~lightning_peft.LoRAConfig`.
    """

    method = "qlora"

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    block_size: int = 64
    compute_dtype: str = "auto"
    int8_threshold: float = 6.0
    quantize_modules: list[str] | str = "all-linear"
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.quant_spec()  # validates
        if self.loftq_iter < 1:
            raise ValueError(f"{type(self).__name__}: loftq_iter={self.loftq_iter!r} is invalid: it must be an integer >= 1")
        if isinstance(self.quantize_modules, str) and self.quantize_modules != "all-linear":
            self.quantize_modules = [self.quantize_modules]

    def init_choices(self) -> list[str]:
        return [*super().init_choices(), "loftq"]

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.quant_type, self.double_quant, self.block_size, self.compute_dtype, self.int8_threshold)


def prepare_qlora(model: nn.Module, config: QLoRAConfig, modules_to_save: list[str]) -> None:
    """Quantize the frozen linear layers of the base (those not quantized yet), outside ``modules_to_save``."""
    require_bitsandbytes()
    skip = tuple(modules_to_save)
    candidates = [(n, m) for n, m in candidate_modules(model) if not is_inside_any(skip, n)]
    if config.quantize_modules == "all-linear":
        names = [n for n in all_linear_modules(model, candidates) if type(base_module(model.get_submodule(n))) is nn.Linear or is_quantized(base_module(model.get_submodule(n)))]
    else:
        names = select_modules(candidates, config.quantize_modules, lambda m: type(m) is nn.Linear or is_quantized(m), "QLoRA quantize_modules", model)
    if config.init == "loftq":  # the LoRA targets are quantized by LoftQ with their adapters (LoRALayer.add_adapter)
        targets = set(resolve_targets(model, config, lambda m: lora_kind(m) is not None, LORA_DEFAULT_TARGETS, "LoRA target_modules", skip=modules_to_save))
        names = [n for n in names if n not in targets]
    quantize_modules(model, names, config.quant_spec())


register_method("qlora", QLoRAConfig, plan_lora, prepare=prepare_qlora)
