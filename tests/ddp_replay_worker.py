"""A real 2-process CPU DDP fit with Replay, run by tests/test_replay.py as a script.

``python tests/ddp_replay_worker.py OUT_DIR``: rank 1 runs this script again (started by tests/two_ranks.py); each rank
fits 2 epochs on 24 new examples (batch 4) with 12 old ones replayed at ratio 1/3, and writes the ids
of every batch it trained on to ``OUT_DIR/rank<r>.pt``.
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
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from test_replay import OLD_ID, Ids, UserModule

from lightning_peft import Replay


def main(out: Path) -> None:
    module = UserModule()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Replay(Ids(12, OLD_ID), ratio=1 / 3)],
    )
    trainer.fit(module, DataLoader(Ids(24), batch_size=4, shuffle=True))
    torch.save(module.seen, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
