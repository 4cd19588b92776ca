"""The Hydra entry point launched by torchrun with 2 CPU processes (how multi-GPU and multi-node jobs start)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from two_ranks import free_port, worker_env

from conftest import REPO, tiny_overrides


def test_torchrun_launches_scripts_train_with_hydra_overrides(tmp_path, tiny_bert_dir):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith(("trainer.max_steps", "callbacks.model_checkpoint"))]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(REPO / "scripts" / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
        "peft=lora", "peft.export_peft=false", "callbacks.model_checkpoint.monitor=null", "logger=none", "callbacks.lr_monitor=null",
        f"hydra.run.dir={run_dir}", *overrides,
    ]
    env = worker_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # both ranks joined one process group
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 32 training examples, batch 8: one epoch is 4 steps on one process, 2 when each of 2 ranks takes half
    assert metrics["final"]["global_step"] == 2
    assert (run_dir / "adapter" / "adapter.json").exists()
    (ckpt,) = (run_dir / "checkpoints").glob("epoch*.ckpt")  # besides last.ckpt
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any(".adapters.default.lora_B" in k for k in state) and not any(k.startswith("backbone.embeddings.word") for k in state)
