"""Parameter counting shared by the summary table, callbacks and tests."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ParamCount", "count_parameters", "parameter_numel", "parameter_rows"]


@dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameter counts (shared tensors counted once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def parameter_numel(param: nn.Parameter) -> int:
    """Logical number of weights: a packed 4-bit bitsandbytes tensor (two weights per byte) counts what it holds."""
    state = getattr(param, "quant_state", None)
    return int(state.shape.numel()) if state is not None and hasattr(state.shape, "numel") else param.numel()


def count_parameters(module: nn.Module) -> ParamCount:
    """Count the parameters of ``module``, each tensor once even when tied (quantized ones by their logical size)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = parameter_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


def parameter_rows(module: nn.Module, depth: int = 2) -> list[tuple[str, str, ParamCount]]:
    """(name, type, counts) for every submodule down to ``depth`` dots, in model order."""
    rows = []
    for name, sub in module.named_modules():
        if not name or name.count(".") >= depth:
            continue
        count = count_parameters(sub)
        if count.total:
            rows.append((name, type(sub).__name__, count))
    return rows
