"""A real 2-process CPU DDP fit with the PEFT callback (LoRA, adapter-only checkpoints), run by tests/test_ddp_peft.py.

``python tests/ddp_peft_worker.py OUT_DIR``; rank 1 runs this script again (started by tests/two_ranks.py). Both ranks
(1) fit 6 steps with an adapter-only ModelCheckpoint every step, (2) resume a fresh module from the
step-3 checkpoint (an epoch boundary: Lightning restarts a plain dataloader's epoch on resume) to step 6, and write ``OUT_DIR/<phase>-rank<r>.pt``: the trainable tensors after
the fit, the losses, the names that trained when DDP wrapped the model, and the first batch seen;
then (3, 4) fit again with the encoder's gradient checkpointing on, re-entrant and not (peft #899), and
(5) fit Houlsby bottleneck adapters instead of LoRA.
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

from lightning_peft import PEFT, AdapterConfig, LoRAConfig


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
        self.first_batch: torch.Tensor | None = None
        self.at_wrap: list[str] = []

    def on_fit_start(self) -> None:
        self.at_wrap = [n for n, p in self.named_parameters() if p.requires_grad]

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.first_batch is None:
            self.first_batch = x.clone()
        loss = F.cross_entropy(self.head(self.bert(x).last_hidden_state.mean(1)), y)
        self.losses[self.global_step] = loss.item()
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=6), "interval": "step"}}


def run(phase: str, out: Path, ckpt_path: Path | None = None) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 50, (24, 8), generator=g), torch.randint(0, 3, (24,), generator=g))  # 3 batches per rank and epoch
    module = UserModule()
    if phase.startswith("checkpointing"):  # peft #899: modules_to_save + gradient checkpointing + DDP
        reentrant = {"checkpointing-reentrant": True, "checkpointing-nonreentrant": False}[phase]
        module.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if phase == "adapter":  # a bottleneck adapter method (Houlsby placement)
        method = AdapterConfig(placement="houlsby", bottleneck_size=4)
    else:
        method = LoRAConfig(r=4, target_modules=["query", "value"])
    callbacks = [PEFT(method, adapter_only_checkpoint=True, verbose=False)]
    if phase == "full":
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=6, max_epochs=-1,
        callbacks=callbacks, logger=False, enable_checkpointing=phase == "full", enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4), ckpt_path=ckpt_path)  # DistributedSampler: other rows per rank
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    checkpointing = getattr(module.bert.encoder.layer[0], "_gradient_checkpointing_func", None)  # partial(checkpoint, use_reentrant=...)
    torch.save(
        {"trainable": trainable, "losses": module.losses, "at_wrap": module.at_wrap, "first_batch": module.first_batch,
         "world_size": trainer.world_size, "use_reentrant": getattr(checkpointing, "keywords", {}).get("use_reentrant")},
        out / f"{phase}-rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    run("full", out_dir)
    run("resumed", out_dir, out_dir / "ckpt" / "step=3.ckpt")
    run("checkpointing-reentrant", out_dir)
    run("checkpointing-nonreentrant", out_dir)
    run("adapter", out_dir)
