"""FSDP support: a wrap policy for the frozen base, replicated adapters with their gradients averaged, wrapper-free
parameter names, and gathering sharded weights before they are written.

FSDP (v1) flattens each wrapped unit's parameters into one ``FlatParameter``. A unit that mixes frozen
and trainable parameters either fails ("FlatParameter requires uniform requires_grad", pytorch
#100945, without ``use_orig_params``) or carries a gradient the size of the whole unit (litgpt
#1417). So only the frozen base is sharded: :class:`FSDPBlockPolicy` wraps each transformer block, and
PEFT's adapter containers (:func:`replicated_modules`) are given to FSDP as ``ignored_states``: each rank
keeps them whole (they are small), :func:`sync_replicated_gradients` averages their gradients, and an
adapter saved from a sharded run holds its full weights (peft #453, #1366). The adapters cannot be their
own FSDP units: a layer reads them directly (``adapters[name](x)``, the fused kernel), never through the
unit's ``forward``, so FSDP would never unshard them. The :class:`~lightning_peft.PEFT` callback does all
of this under Lightning's ``FSDPStrategy``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch.distributed as dist
from torch import nn

from ..groups.matching import clean_name
from ..peft.layer import AdapterDict
from .gradients import all_reduce_grads_mean_

__all__ = ["DEFAULT_BLOCKS", "FSDPBlockPolicy", "clean_name", "gathered_parameters", "replicated_modules", "sync_replicated_gradients"]

# Transformer block classes of common architectures (transformers and timm), matched by class name.
DEFAULT_BLOCKS = (
    "BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "TransformerBlock", "ViTLayer", "DeiTLayer",
    "GPT2Block", "GPTNeoXLayer", "LlamaDecoderLayer", "MistralDecoderLayer", "MixtralDecoderLayer",
    "Qwen2DecoderLayer", "Qwen3DecoderLayer", "GemmaDecoderLayer", "Gemma2DecoderLayer", "Phi3DecoderLayer",
    "OPTDecoderLayer", "T5Block", "Block",
)


class FSDPBlockPolicy:
    """FSDP ``auto_wrap_policy``: a unit per transformer block (matched by class name).

    Args:
        blocks: class names of the blocks to wrap (default: :data:`DEFAULT_BLOCKS`).

    Use it in ``FSDPStrategy(auto_wrap_policy=FSDPBlockPolicy())`` (``trainer=fsdp`` does). Adapters inside
    the blocks stay out of the units when they are FSDP's ``ignored_states`` (:func:`replicated_modules`).
    """

    def __init__(self, blocks: Sequence[str] | None = None) -> None:
        self.blocks = frozenset(blocks or DEFAULT_BLOCKS)

    def wraps(self, module: nn.Module) -> bool:
        """Whether ``module`` becomes a unit of its own."""
        return type(module).__name__ in self.blocks

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0, **kwargs: object) -> bool:
        return True if recurse else self.wraps(module)


def replicated_modules(model: nn.Module) -> list[nn.Module]:
    """Every adapter container of ``model`` (PEFT's trainable state): FSDP's ``ignored_states``, whole on every rank."""
    return [m for m in model.modules() if isinstance(m, AdapterDict)]


def sync_replicated_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Average the gradients of the replicated adapter parameters over the ranks, as DDP would; returns their count.

    FSDP reduces only the gradients of what it shards. The averaging is
    :func:`~lightning_peft.distributed.gradients.all_reduce_grads_mean_` (one all-reduce; a parameter with
    no gradient on any rank keeps ``grad=None``). A no-op returning 0 outside a process group of several ranks.
    """
    params = [p for m in replicated_modules(model) for p in m.parameters() if p.requires_grad]
    return all_reduce_grads_mean_(params, group)


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
