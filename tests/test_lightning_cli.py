"""Lightning's own LightningCLI configures lightning_peft's callbacks from YAML by class_path.

The run loads exactly docs/lightning_cli.yaml (the README's example), with tiny overrides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_peft import LoRAConfig, QLoRAConfig, TextClassifier, list_adapters
from lightning_peft.peft.config_input import as_method_config
from lightning_peft.peft.layer import AdapterLayer

pytest.importorskip("jsonargparse", reason="LightningCLI needs the 'cli' extra (jsonargparse[signatures])")

DOCS_YAML = Path(__file__).resolve().parents[1] / "docs" / "lightning_cli.yaml"


class TrainableLog(pl.Callback):
    """Names of the trainable parameters at each epoch start (added from the command line by class_path)."""

    seen: ClassVar[list[set[str]]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        TrainableLog.seen.append({n for n, p in pl_module.named_parameters() if p.requires_grad})


def _table(tmp_path) -> str:
    path = tmp_path / "reviews.csv"
    rows = [("a good film", "pos"), ("a bad film", "neg"), ("a film", "neutral")] * 4
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])  # LightningCLI warns when both args and sys.argv hold options


def _tiny_args(tmp_path, tiny_bert_dir: str) -> list[str]:
    return [
        f"--model.init_args.name_or_path={tiny_bert_dir}",
        "--model.init_args.num_classes=3",
        "--data.init_args.dataset=table",
        f"--data.init_args.dataset_kwargs={json.dumps({'path': _table(tmp_path)})}",
        f"--data.init_args.tokenizer={tiny_bert_dir}",
        "--data.init_args.max_length=16",
        "--data.init_args.batch_size=4",
        "--trainer.accelerator=cpu",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def test_lightning_cli_runs_the_documented_yaml_with_peft_gradual_unfreezing_and_discriminative_lr(tmp_path, tiny_bert_dir):
    TrainableLog.seen = []
    args = ["fit", f"--config={DOCS_YAML}", *_tiny_args(tmp_path, tiny_bert_dir), f"--trainer.callbacks+={__name__}.TrainableLog"]
    cli = LightningCLI(args=args, save_config_callback=None)

    model, trainer = cli.model, cli.trainer
    assert isinstance(model, TextClassifier) and trainer.current_epoch == 3
    # PEFT: LoRA r=8 on query and value of both layers, as the YAML says; the base never trains.
    peft = next(c for c in trainer.callbacks if type(c).__name__ == "PEFT")
    assert isinstance(peft.config, LoRAConfig) and (peft.config.r, peft.config.alpha, peft.config.target_modules) == (8, 16, ["query", "value"])
    assert list_adapters(model) == ["default"]
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and n.startswith("backbone."))
    assert wrapped == [f"backbone.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    assert all(".adapters." in n for mask in TrainableLog.seen for n in mask)
    # GradualUnfreezing: the head first, then layer 1's adapters, then layer 0's.
    first, second, third = TrainableLog.seen
    assert first and all(n.startswith("head.") for n in first)
    assert any("layer.1." in n for n in second) and not any("layer.0." in n for n in second)
    assert any("layer.0." in n for n in third)
    # DiscriminativeLR: each group below the head at 0.5x the rate of the group above it (AdamW lr=1e-3 at the head).
    rates = {g["layer_group"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert rates["head"] == pytest.approx(1e-3)
    assert rates["backbone.encoder.layer.1"] == pytest.approx(0.5e-3)
    assert rates["backbone.encoder.layer.0"] == pytest.approx(0.25e-3)


def test_lightning_cli_reports_a_misspelled_method_option(tmp_path, tiny_bert_dir):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text(DOCS_YAML.read_text().replace("            r: 8\n", "            rank: 8\n"))
    assert "rank: 8" in yaml.read_text()
    with pytest.raises(ValueError, match=r"Unknown LoRAConfig option\(s\) \['rank'\]; valid options: \['adapter_dtype', 'alpha'"):
        LightningCLI(args=["fit", f"--config={yaml}", *_tiny_args(tmp_path, tiny_bert_dir)], save_config_callback=None)


# --- the config forms PEFT accepts ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        ({"class_path": "lightning_peft.LoRAConfig", "init_args": {"r": 4}}, LoRAConfig(r=4)),
        ({"class_path": "lightning_peft.peft.lora.LoRAConfig"}, LoRAConfig()),
        ({"class_path": "QLoRAConfig", "init_args": {"r": 2, "bits": 8}}, QLoRAConfig(r=2, bits=8)),
        ({"method": "lora", "r": 4}, LoRAConfig(r=4)),
    ],
)
def test_method_config_from_class_path_or_method_dict(value, expected):
    assert as_method_config(value) == expected


@pytest.mark.parametrize(
    "value,message",
    [
        ({"class_path": "lightning_peft.LoRAConfig", "init_args": {"rr": 4}}, r"Unknown LoRAConfig option\(s\) \['rr'\]; valid options: \["),
        ({"class_path": "lightning_peft.LoraConfig"}, r"config\.class_path='lightning_peft\.LoraConfig' is not a method config class; choose one of .*lightning_peft\.LoRAConfig"),
        ({"class_path": "torch.nn.Linear"}, r"config\.class_path='torch\.nn\.Linear' is not a method config class"),
        ({"class_path": "nowhere.Config"}, r"config\.class_path='nowhere\.Config' is not a method config class"),
        ({"class_path": "LoRAConfig", "init_args": [4]}, r"config\.init_args must be a mapping of LoRAConfig options, got \[4\]"),
        ({"class_path": "LoRAConfig", "r": 4}, r"config: unknown key\(s\) \['r'\] beside class_path; valid keys: \['class_path', 'init_args'\]"),
        ({"r": 4}, r"Unknown parameter-efficient method None"),
    ],
)
def test_method_config_errors_name_the_option_or_class(value, message):
    with pytest.raises(ValueError, match=message):
        as_method_config(value)
