"""``peft_callback``: the :class:`~lightning_peft.PEFT` callback from one flat Hydra node.

``configs/peft/<method>.yaml`` is this function's arguments: the callback's own options and the
method's options side by side, so each knob is written once and overridden by a short path
(``peft.r=16``, ``peft.rank_pattern={query:16}``, ``peft.adapter_only_checkpoint=false``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..callbacks.peft import PEFT
from ..peft.registry import METHODS, config_from_dict

__all__ = ["peft_callback"]


def peft_callback(
    method: str,
    lr: float | None = None,
    adapter_name: str = "default",
    adapter_only_checkpoint: bool = False,
    save_dir: str | Path | None = None,
    export_peft: bool = False,
    check_gradients: bool = True,
    verbose: bool = True,
    train_bn: bool = False,
    **options: Any,
) -> PEFT:
    """Build ``PEFT(<method config>(**options), ...)``; an unknown option raises, naming the valid ones.

    Args:
        method: registered method name (``lora``, ``qlora``, ``ia3``, ``bitfit``, ``adapter``, ...).
        lr: the optimizer's learning rate with this method. Not used by the callback: the model's
            optimizer reads it (``peft.lr`` replaces ``finetune.lr`` in ``configs/train.yaml``).
        adapter_name, adapter_only_checkpoint, save_dir, export_peft, check_gradients, verbose, train_bn:
            passed to :class:`~lightning_peft.PEFT`.
        **options: the method config's fields (``LoRAConfig``: ``r``, ``alpha``, ``rank_pattern``, ...).

    Example:
        >>> peft_callback("lora", r=4).config.r
        4
    """
    del lr  # read by the optimizer, see the docstring
    config = config_from_dict({"method": method, **options})
    return PEFT(
        config, adapter_name=adapter_name, adapter_only_checkpoint=adapter_only_checkpoint, save_dir=save_dir,
        export_peft=export_peft, check_gradients=check_gradients, verbose=verbose, train_bn=train_bn,
    )


def _options_target(node: Mapping[str, Any]) -> Callable[..., Any] | None:
    """What ``**options`` are checked against (for ``config_check``): the config class of ``node["method"]``."""
    method = METHODS.get(node.get("method"))
    return method.config if method is not None else None


peft_callback.kwargs_target = _options_target  # type: ignore[attr-defined]
