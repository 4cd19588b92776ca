"""FSDP support: a wrap policy that keeps trainable adapters out of frozen flat parameters, wrapper-free
parameter names, and gathering sharded adapters before they are written.

FSDP (v1) flattens each wrapped unit's parameters into one ``FlatParameter``. A unit that mixes frozen
and trainable parameters either fails ("FlatParameter requires uniform requires_grad", pytorch
#100945, without ``use_orig_params``) or carries a gradient the size of the whole unit (litgpt
#1417). :class:`FSDPBlockPolicy` wraps each transformer block and, inside it, each adapter container
(:class:`~lightning_peft.peft.layer.AdapterDict`) as units of their own, so frozen weights and
adapters never share a flat parameter. Sharded adapters are gathered before saving, so an adapter
saved from a sharded run holds its full weights (peft #453, #1366).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

from torch import nn

from .matching import clean_name
from .peft.layer import AdapterDict

__all__ = ["DEFAULT_BLOCKS", "FSDPBlockPolicy", "clean_name", "gathered_parameters"]

# Transformer block classes of common architectures (transformers and timm), matched by class name.
DEFAULT_BLOCKS = (
    "BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "TransformerBlock", "ViTLayer", "DeiTLayer",
    "GPT2Block", "GPTNeoXLayer", "LlamaDecoderLayer", "MistralDecoderLayer", "MixtralDecoderLayer",
    "Qwen2DecoderLayer", "Qwen3DecoderLayer", "GemmaDecoderLayer", "Gemma2DecoderLayer", "Phi3DecoderLayer",
    "OPTDecoderLayer", "T5Block", "Block",
)


class FSDPBlockPolicy:
    """FSDP ``auto_wrap_policy``: a unit per transformer block (by class name) and per adapter container.

    Args:
        blocks: class names of the blocks to wrap (default: :data:`DEFAULT_BLOCKS`).
        wrap_adapters: give every :class:`AdapterDict` its own unit (trainable parameters apart from frozen ones).

    Use it in ``FSDPStrategy(auto_wrap_policy=FSDPBlockPolicy())`` (``trainer=fsdp`` does).
    """

    def __init__(self, blocks: Sequence[str] | None = None, wrap_adapters: bool = True) -> None:
        self.blocks = frozenset(blocks or DEFAULT_BLOCKS)
        self.wrap_adapters = wrap_adapters

    def wraps(self, module: nn.Module) -> bool:
        """Whether ``module`` becomes a unit of its own."""
        return type(module).__name__ in self.blocks or (self.wrap_adapters and isinstance(module, AdapterDict))

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0, **kwargs: object) -> bool:
        return True if recurse else self.wraps(module)


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


@contextlib.contextmanager
def gathered_parameters(model: nn.Module, rank0_only: bool = True) -> Iterator[None]:
    """Inside the block, every parameter of ``model`` holds its full value (on rank 0 with ``rank0_only``).

    A collective under FSDP (every rank must enter it); a no-op for unsharded models (single device, DDP).
    """
    units = _fsdp_units(model)
    if not units:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    roots: Iterable[nn.Module] = [u for u in units if not any(u is not o and any(m is u for m in o.modules()) for o in units)]
    with contextlib.ExitStack() as stack:
        for root in roots:
            stack.enter_context(FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=rank0_only, offload_to_cpu=rank0_only))
        yield
