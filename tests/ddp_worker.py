"""A real 2-process CPU DDP fit with GradualUnfreezing and DiscriminativeLR, run by tests/test_ddp.py as a script.

``python tests/ddp_worker.py OUT_DIR MODE [MODE ...]`` with MODE ``sync`` (the callback as shipped) or
``nosync`` (its gradient averaging switched off: the control). Rank 1 runs this script
again (started by tests/two_ranks.py); both ranks fit once per MODE, in order, and each writes ``OUT_DIR/<mode>-rank<r>.pt``:
weights before and after the fit, the parameters that trained when DDP wrapped the model and at
each epoch start, and the inputs of the rank's first batch.
"""

from __future__ import annotations

if __name__ == "__main__":  # rank 1 starts now and imports beside rank 0 (tests/two_ranks.py)
    from two_ranks import start_second_rank

    start_second_rank()

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_peft import DiscriminativeLR, GradualUnfreezing

EPOCHS = 3  # groups unfreeze at epochs 1 and 2, after DDP wrapped the model at fit start


class UserModule(pl.LightningModule):
    """A user's BERT classifier (knows nothing of lightning_peft); the optimizer takes trainable parameters only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(config)
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.bert(x).pooler_output), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=6)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class NoSyncGradualUnfreezing(GradualUnfreezing):
    """The control: GradualUnfreezing without its averaging of late-unfrozen gradients (lightning #20340 as is)."""

    def on_after_backward(self, trainer, pl_module) -> None:
        pass


class Probe(pl.Callback):
    """What trained when DDP had just wrapped the model and at each epoch start, and the first batch seen."""

    def __init__(self) -> None:
        self.at_wrap: list[str] = []
        self.per_epoch: list[list[str]] = []
        self.first_batch: torch.Tensor | None = None

    def on_fit_start(self, trainer, pl_module):
        self.at_wrap = [n for n, p in pl_module.named_parameters() if p.requires_grad]

    def on_train_epoch_start(self, trainer, pl_module):  # runs after GradualUnfreezing's (callback order)
        self.per_epoch.append([n for n, p in pl_module.named_parameters() if p.requires_grad])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = batch[0].clone()


def run(mode: str, out: Path) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 50, (32, 8), generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = DataLoader(data, batch_size=4)  # Lightning swaps in a DistributedSampler: each rank gets other rows
    module = UserModule()
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    unfreezing = GradualUnfreezing if mode == "sync" else NoSyncGradualUnfreezing
    probe = Probe()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_epochs=EPOCHS,
        callbacks=[unfreezing(every_n_epochs=1, verbose=False), DiscriminativeLR(decay=0.5, verbose=False), probe],
        logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, loader)
    final = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save(
        {"initial": initial, "final": final, "at_wrap": probe.at_wrap, "per_epoch": probe.per_epoch,
         "first_batch": probe.first_batch, "world_size": trainer.world_size,
         "lrs": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}},
        out / f"{mode}-rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for mode in sys.argv[2:]:
        run(mode, out_dir)
