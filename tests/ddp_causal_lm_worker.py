"""One SGD step of CausalLM on 8 records in a real 2-process CPU DDP fit (gloo), run by tests/test_causal_lm.py as a script.

``python tests/ddp_causal_lm_worker.py OUT_FILE``: Lightning relaunches this script as rank 1; rank r trains on
records 4r..4r+3 (its own shard, no distributed sampler), so rank 0 sees 8 completion tokens and rank 1 52: a
mean per rank would weigh rank 0's tokens 6.5x as much. Rank 0 saves the weights after the step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import CausalLM, InstructionDataModule, load_tokenizer

# The first 4 records (rank 0's) have short completions, the last 4 (rank 1's) long ones.
RECORDS = [{"prompt": f"Question {i}?", "completion": "yes " * (1 if i < 4 else 12)} for i in range(8)]


def tokenizer():
    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    tok.eos_token = "[SEP]"
    return tok


def one_step(devices: int, batch_size: int) -> tuple[pl.Trainer, CausalLM]:
    """Fit one SGD step (lr 1) from the same tiny Llama: one process on all RECORDS, or each of 2 ranks on its half."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, bos_token_id=101, eos_token_id=102, initializer_range=0.3)
    tok = tokenizer()
    model = CausalLM(LlamaForCausalLM(config), tokenizer=tok, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning for the relaunched rank 1
    shard = RECORDS if devices == 1 else RECORDS[4 * rank : 4 * rank + 4]
    dm = InstructionDataModule(tok, train=shard, val=RECORDS[:2], max_length=48, batch_size=batch_size, template="plain",
                               generate_size=0, shuffle=False)
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)
    return trainer, model


if __name__ == "__main__":
    trainer, model = one_step(devices=2, batch_size=4)
    if trainer.global_rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, Path(sys.argv[1]))
