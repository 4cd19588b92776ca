"""A real 2-process FSDP fit on CPU (gloo) with the PEFT callback, run by tests/test_fsdp_peft.py.

``python tests/fsdp_peft_worker.py OUT_DIR``; rank 1 runs this script again (started by tests/two_ranks.py). Lightning
refuses ``FSDPStrategy`` without CUDA by an exact type check, and PyTorch's FSDP itself runs on CPU
with gloo, so :class:`CPUFSDPStrategy` (a subclass that changes nothing) lets the real strategy run
here. Phases: ``fsdp`` (LoRA on q/v plus the user's head, frozen base sharded by ``FSDPBlockPolicy``,
adapter saved at fit end), ``fsdp-adapter`` (Houlsby bottleneck adapters) and ``ddp`` (the same LoRA fit
under DDP, the reference). Each rank writes ``OUT_DIR/<phase>-rank<r>.pt``: the adapter and head weights,
the losses, the
first step's gradients as the optimizer gets them, the flat parameters' ``requires_grad``, and which tensors of the gathered frozen base differ from the
base before the fit (and how many of them were compared).
"""

from __future__ import annotations

if __name__ == "__main__":  # rank 1 starts now and imports beside rank 0 (tests/two_ranks.py)
    from two_ranks import start_second_rank

    start_second_rank()

import sys
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_peft import (
    PEFT,
    AdapterConfig,
    FSDPBlockPolicy,
    LoRAConfig,
    gathered_parameters,
)
from lightning_peft.groups.matching import clean_name


class _CPUFSDP(FullyShardedDataParallel):
    """PyTorch's FSDP given ``device_id=cpu`` where Lightning passes ``None`` (CUDA index of a CPU device)."""

    def __init__(self, module: nn.Module, *args, device_id=None, **kwargs) -> None:
        super().__init__(module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy run on CPU: the subclass passes the accelerator check (which tests the exact type)
    and wraps with ``device_id=cpu`` (PyTorch's FSDP refuses ``None`` without an accelerator); nothing else changes."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        with mock.patch.object(torch.distributed.fsdp, "FullyShardedDataParallel", _CPUFSDP):
            return super()._setup_model(model)


class UserModule(pl.LightningModule):
    """A user's BERT classifier (knows nothing of lightning_peft); the optimizer takes every parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(16, 3)
        self.losses: dict[int, float] = {}
        self.flat_requires_grad: list[bool] = []
        self.first_grads: dict[str, torch.Tensor] | None = None

    def on_fit_start(self) -> None:
        self.flat_requires_grad = [p.requires_grad for p in self.trainer.model.parameters() if type(p).__name__ == "FlatParameter"]
        for module in self.trainer.model.modules():
            handle = getattr(module, "_handle", None)
            if handle is not None and getattr(handle, "flat_param", None) is not None:
                flat = handle.flat_param
                self.flat_requires_grad.append(any(getattr(flat, "_params", None) is None or p.requires_grad for p in flat._params))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.bert(x).last_hidden_state.mean(1)), y)
        self.losses[self.global_step] = loss.item()
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:  # after the callbacks' hook: the PEFT callback has averaged
        if self.first_grads is None:
            self.first_grads = {clean_name(n): p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def run(phase: str, out: Path) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 50, (24, 8), generator=g), torch.randint(0, 3, (24,), generator=g))
    module = UserModule()
    base = {n: p.detach().clone() for n, p in module.bert.named_parameters()}
    method = AdapterConfig(placement="houlsby", bottleneck_size=4) if phase == "fsdp-adapter" else LoRAConfig(r=4, target_modules=["query", "value"])
    if phase == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    else:
        strategy = CPUFSDPStrategy(auto_wrap_policy=FSDPBlockPolicy(), process_group_backend="gloo", sharding_strategy="FULL_SHARD")
    callback = PEFT(method, adapter_only_checkpoint=False, save_dir=out / f"{phase}-adapter", verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=6, max_epochs=-1, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    trainable = {clean_name(n): p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with gathered_parameters(trainer.model, rank0_only=False):  # a wrapped layer's weight is named ....base_layer.weight
        after = {clean_name(n).replace(".base_layer", ""): p.detach().clone() for n, p in module.bert.named_parameters() if ".adapters." not in n}
    compared = [n for n in base if n in after]
    torch.save(
        {"trainable": trainable, "losses": module.losses, "first_grads": module.first_grads, "flat_requires_grad": module.flat_requires_grad,
         "base_changed": [n for n in compared if not torch.equal(after[n], base[n])], "base_compared": len(compared),
         "base_count": len(base), "base_numel": sum(p.numel() for p in after.values()), "world_size": trainer.world_size,
         "wrapped": type(trainer.model).__name__},
        out / f"{phase}-rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for phase in sys.argv[2:] or ["fsdp", "fsdp-adapter", "ddp"]:
        run(phase, out_dir)
