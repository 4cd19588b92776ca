"""One SGD step of CausalLM on 8 records in a real 2-process CPU DDP fit (gloo), run by tests/test_causal_lm.py as a script.

``python tests/ddp_causal_lm_worker.py OUT_FILE``: rank 1 runs this script again (started by tests/two_ranks.py) and injects its
``DistributedSampler`` into InstructionDataModule's batch sampler, so rank r trains on records r, r+2, r+4, r+6 in
two micro-batches of 2, accumulated into one step. The completions are uneven across ranks (rank 0: 16 tokens,
rank 1: 52) and across micro-batches, so any mean of per-rank or per-micro-batch means differs from the mean
over all 68 completion tokens. Rank 0 saves the weights after the step.
"""

from __future__ import annotations

if __name__ == "__main__":  # rank 1 starts now and imports beside rank 0 (tests/two_ranks.py)
    from two_ranks import start_second_rank

    start_second_rank()

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from tiny_models import minilm_llama

from lightning_peft import CausalLM, InstructionDataModule, load_tokenizer

# Even records go to rank 0, odd ones to rank 1; words per completion (each word one token, plus EOS).
WORDS = [1, 12, 1, 12, 4, 2, 6, 22]
RECORDS = [{"prompt": f"Question {i}?", "completion": "yes " * n} for i, n in enumerate(WORDS)]


def tokenizer():
    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    tok.eos_token = "[SEP]"
    return tok


def one_step(devices: int, batch_size: int, accumulate: int = 1) -> tuple[pl.Trainer, CausalLM]:
    """Fit one SGD step (lr 1) from the same tiny Llama on all RECORDS: one process, or 2 ranks sharing them."""
    tok = tokenizer()
    model = CausalLM(minilm_llama(seed=1), tokenizer=tok, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    dm = InstructionDataModule(tok, train=RECORDS, val=RECORDS[:2], max_length=48, batch_size=batch_size, template="plain",
                               generate_size=0, shuffle=False)
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accumulate_grad_batches=accumulate)
    trainer.fit(model, datamodule=dm)
    return trainer, model


if __name__ == "__main__":
    trainer, model = one_step(devices=2, batch_size=2, accumulate=2)
    if trainer.global_rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, Path(sys.argv[1]))
