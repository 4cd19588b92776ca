"""`train=false`: validate a model as built (the zero-shot baseline) or a finished run's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_zero_shot_validates_without_training_and_says_nothing_trained(compose, tiny_llama_dir, instructions_jsonl):
    from conftest import tiny_llm_overrides
    from lightning_peft.cli.train import train

    cfg = compose(*tiny_llm_overrides(tiny_llama_dir, instructions_jsonl), "data.val_size=4", "train=false")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert {"val/loss", "val/rougeL", "val/exact_match"} <= set(metrics)
    data = json.loads((out / "metrics.json").read_text())
    assert data["run"]["trained"] is False and data["run"]["trainable_parameters"] == 0
    assert data["run"]["total_parameters"] > 0 and data["final"]["global_step"] == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4


def test_validating_a_checkpoint_reproduces_the_runs_final_validation(compose, tiny_llama_dir, instructions_jsonl, tmp_path):
    from conftest import tiny_llm_overrides
    from lightning_peft.cli.train import train

    overrides = [o for o in tiny_llm_overrides(tiny_llama_dir, instructions_jsonl) if not o.startswith("callbacks.model_checkpoint")]
    trained = train(compose(*overrides, "experiment=smollm2_topics", "data.val_size=4", "peft=lora", "trainer.max_steps=3", "trainer.val_check_interval=3"))
    ckpt = Path(tmp_path) / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    again = train(compose(*overrides, "experiment=smollm2_topics", "data.val_size=4", "peft=lora", "train=false", f"ckpt_path={ckpt}"))
    assert again["val/loss"] == pytest.approx(trained["val/loss"], rel=1e-6)
    assert again["val/rougeL"] == pytest.approx(trained["val/rougeL"])
