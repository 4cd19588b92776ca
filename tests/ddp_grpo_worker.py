"""Two GRPO steps with LoRA and a KL term in a real 2-process CPU DDP fit (gloo), run by tests/test_grpo.py as a script.

``python tests/ddp_grpo_worker.py OUT_DIR``: rank 1 runs this script again (started by tests/two_ranks.py); rank r samples from its own
half of the prompts (no distributed sampler). Each rank saves the adapter before the first step, every rollout it
scored, and the adapter after the last step, so the test can check that the ranks agree and replay the steps in
one process with the loss normalised by the tokens of both ranks.
"""

from __future__ import annotations

if __name__ == "__main__":  # rank 1 starts now and imports beside rank 0 (tests/two_ranks.py)
    from two_ranks import start_second_rank

    start_second_rank()

import dataclasses
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from grpo_helpers import RECORDS, word_llama, word_tokenizer, yes_reward
from lightning.pytorch.strategies import DDPStrategy

from lightning_peft import GRPO, PEFT, InstructionDataModule, LoRAConfig

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
SETTINGS = {"num_generations": 4, "max_new_tokens": 3, "beta": 0.1}
LR = 0.5


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class Recording(GRPO):
    """GRPO that keeps its rollouts and its trainable weights at the start of training."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rollouts: list[dict[str, object]] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self) -> None:
        self.start = trainable(self)  # after DDP's broadcast of rank 0's weights

    def rollout(self, batch):
        result = super().rollout(batch)
        self.rollouts.append(dataclasses.asdict(result))
        return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    model = Recording(
        word_llama(), reward=yes_reward, tokenizer=word_tokenizer(), optimizer=lambda ps: torch.optim.SGD(ps, lr=LR), **SETTINGS
    )
    rank = int(os.environ.get("LOCAL_RANK", 0))
    dm = InstructionDataModule(
        word_tokenizer(),
        train=RECORDS[8 * rank : 8 * rank + 8],
        val=RECORDS[:2],
        max_length=32,
        batch_size=4,
        generate_size=0,
        shuffle=False,
        train_prompts=True,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[PEFT(LORA, verbose=False)],
    )
    trainer.fit(model, datamodule=dm)
    torch.save({"start": model.start, "rollouts": model.rollouts, "end": trainable(model)}, out / f"rank{trainer.global_rank}.pt")
