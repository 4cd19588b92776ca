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
