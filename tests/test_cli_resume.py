"""Resuming ``train(cfg)`` and ``scripts/train.py`` runs: a run stopped after epoch 0 and resumed from its
checkpoint ends bit-identical to the uninterrupted run (losses of every later step, final weights and
metrics), for full fine-tuning, LoRA with adapter-only checkpoints and gradual unfreezing. Checkpoints
load with ``torch.load(weights_only=True)`` (no OmegaConf objects), their names need no quoting on the
command line, and SIGTERM leaves a resumable ``last.ckpt`` and exit status 143."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from conftest import REPO, tiny_overrides
from lightning_peft.cli.resume import resolve_ckpt_path
from lightning_peft.cli.train import train

pytestmark = pytest.mark.filterwarnings("ignore:The dirpath has changed")


def _fast(model_dir: str) -> list[str]:
    """2 epochs of 2 steps, a checkpoint per epoch plus last.ckpt, CSV logs only."""
    return [o for o in tiny_overrides(model_dir) if not o.startswith(("callbacks.model_checkpoint", "data.train_size", "data.val_size", "trainer.max_steps"))] + [
        "data.train_size=16", "data.val_size=8", "trainer.max_steps=-1", "trainer.max_epochs=2",
        "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=-1", "~logger.tensorboard",
    ]


def _run(compose, out: Path, *overrides: str) -> dict:
    cfg = compose(*overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    metrics = train(cfg)
    with open(out / "csv" / "metrics.csv") as f:
        losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"metrics": metrics, "losses": losses, "state": state["state_dict"], "step": state["global_step"]}


@pytest.mark.parametrize("choice", ["finetune=full", "peft=lora", "finetune=gradual_unfreeze"])
def test_resumed_run_equals_the_uninterrupted_run(compose, tmp_path, tiny_bert_dir, choice):
    overrides = [choice, *_fast(tiny_bert_dir)]
    a = _run(compose, tmp_path / "a", *overrides)
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch00-step000002.ckpt", "epoch01-step000004.ckpt", "last.ckpt"]
    mid = tmp_path / "a" / "checkpoints" / "epoch00-step000002.ckpt"
    saved = torch.load(mid, map_location="cpu", weights_only=True)  # safe loading: plain containers only
    assert saved["hyper_parameters"]["label_names"] == list(saved["hyper_parameters"]["label_names"])
    if choice == "peft=lora":
        assert not any(k.startswith("backbone.embeddings.") for k in saved["state_dict"])  # adapter-only

    b = _run(compose, tmp_path / "b", *overrides, f"ckpt_path={mid}")  # unquoted, as on the command line

    assert a["step"] == b["step"] == 4
    assert sorted(b["losses"]) == [2, 3] and {s: a["losses"][s] for s in (2, 3)} == b["losses"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert b["metrics"] == a["metrics"]
    assert any(not torch.equal(saved["state_dict"][k], b["state"][k]) for k in saved["state_dict"])  # epoch 1 trained


def test_readme_distillation_teacher_command_loads_a_run_checkpoint(compose, tmp_path, tiny_bert_dir):
    fast = [o for o in _fast(tiny_bert_dir) if o != "trainer.max_epochs=2"] + ["trainer.max_epochs=1"]
    _run(compose, tmp_path / "teacher", *fast)
    (teacher,) = (tmp_path / "teacher" / "checkpoints").glob("epoch*.ckpt")
    metrics = _run(compose, tmp_path / "student", "finetune=distill", f"finetune.teacher={teacher}", *fast)["metrics"]
    assert metrics["train/loss"] > 0


def test_ckpt_path_last_and_missing_files(tmp_path, caplog):
    assert resolve_ckpt_path("last", tmp_path) is None  # nothing yet: a requeued job starts fresh
    assert "no last.ckpt" in caplog.text
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "last.ckpt")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='.*nope\.ckpt': no such checkpoint.*last\.ckpt"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


def _cli(model_dir: str, run_dir: Path, *overrides: str, wait_for: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), *_fast(model_dir), "logger=none", f"hydra.run.dir={run_dir}", *overrides]
    command.remove("~logger.tensorboard")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait_for is not None:
        deadline = time.monotonic() + 240
        while not wait_for.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert wait_for.exists(), proc.communicate()[0][-4000:]
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, out)


def test_cli_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path, tiny_bert_dir):
    run, marker = tmp_path / "run", tmp_path / "at-step-3"
    pause = ["+callbacks.pause._target_=cli_helpers.PauseAtStep", "+callbacks.pause.step=3", f"+callbacks.pause.marker={marker}"]
    stopped = _cli(tiny_bert_dir, run, *pause, wait_for=marker)

    assert stopped.returncode == 143, stopped.stdout[-4000:]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    assert f"ckpt_path={last}" in stopped.stdout  # the log says how to resume
    assert not list((run / "checkpoints").glob(".*.tmp"))

    resumed = _cli(tiny_bert_dir, tmp_path / "resumed", f"ckpt_path={last}")  # unquoted path

    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["final"]["global_step"] == 4
