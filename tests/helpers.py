"""Small user-style LightningModules used across tests (they know nothing of lightning_peft)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class VisionClassifier(pl.LightningModule):
    """A user's module around any image backbone; its optimizer takes *all* parameters."""

    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


def image_loader(n: int = 16, classes: int = 3, size: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fit(module: pl.LightningModule, loader: DataLoader, callbacks=(), steps: int = 3, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, callbacks=list(callbacks), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, by name."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def frozen_base(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every non-adapter tensor, by name (``.base_layer`` dropped), with each 4-bit layer's packed storage
    and its whole quantisation state: ``absmax``, ``code``, and under double quantisation the scales' own
    ``state2.absmax``, ``state2.code`` and ``offset`` (a ``state_dict`` alone would not show an in-place change there)."""
    out = {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items() if ".adapters." not in k}
    for name, param in module.named_parameters(remove_duplicate=False):
        state = getattr(param, "quant_state", None)
        if state is None or ".adapters." in name:
            continue
        name = name.replace(".base_layer", "")
        out[f"{name}:packed"] = param.data.clone()
        out[f"{name}:absmax"] = state.absmax.clone()
        out[f"{name}:code"] = state.code.clone()
        if state.nested:
            out[f"{name}:offset"] = torch.as_tensor(state.offset).clone()
            out[f"{name}:state2.absmax"] = state.state2.absmax.clone()
            out[f"{name}:state2.code"] = state.state2.code.clone()
    return out
