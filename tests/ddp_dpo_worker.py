"""One SGD step of LoRA DPO on 4 preference pairs in a real 2-process CPU DDP fit (gloo), run by tests/test_dpo.py as a script.

``python tests/ddp_dpo_worker.py OUT_DIR``: rank 1 runs this script again (started by tests/two_ranks.py); rank 0 trains on pair 0 and
rank 1 on pairs 1-3 (their own shards, no distributed sampler), so a mean per rank would weigh pair 0 three times
as much as the others. The reference is the same network with its (randomised) adapter disabled. Each rank saves
its trainable weights after the step to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

if __name__ == "__main__":  # rank 1 starts now and imports beside rank 0 (tests/two_ranks.py)
    from two_ranks import start_second_rank

    start_second_rank()

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from tiny_models import minilm_llama, randomize

from lightning_peft import DPO, LoRAConfig, PreferenceDataModule, inject, load_tokenizer

# Pair 0 (rank 0's) has one-token completions, the others long ones.
PAIRS = [{"prompt": f"Question {i}?", "chosen": "yes " * (1 if i < 1 else 6), "rejected": "no " * (1 if i < 1 else 3)} for i in range(4)]


def one_step(devices: int) -> tuple[pl.Trainer, DPO]:
    """One SGD step (lr 1) from the same tiny Llama and adapter: one process on all PAIRS, or each of 2 ranks on its shard."""
    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    tok.eos_token = "[SEP]"
    model = DPO(minilm_llama(seed=1), tokenizer=tok, beta=0.5, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    torch.manual_seed(2)  # LoRA's A is random: inject here, not in the Trainer, whose setup may draw from the RNG
    inject(model, LoRAConfig(r=4, target_modules="all-linear", dropout=0.0))
    randomize(model, std=0.3)  # B != 0: the policy differs from the reference and every adapter weight gets a gradient
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by tests/two_ranks.py for rank 1
    shard = PAIRS if devices == 1 else [PAIRS[:1], PAIRS[1:]][rank]
    dm = PreferenceDataModule(tok, train=shard, val=PAIRS[:1], max_length=32, batch_size=len(shard), template="plain", shuffle=False)
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)
    return trainer, model


if __name__ == "__main__":
    trainer, model = one_step(devices=2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(weights, Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")
