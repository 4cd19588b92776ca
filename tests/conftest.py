"""Shared fixtures: offline settings, a tiny random BERT with a real tokenizer, Hydra composition."""

from __future__ import annotations

# Offline settings and the Triton interpreter are set in the repository's root conftest.py.
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 BERT (random weights) saved with the real MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    from lightning_peft import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(path)
    load_tokenizer("sentence-transformers/all-MiniLM-L6-v2").save_pretrained(path)
    return str(path)


# A tiny chat template for tests (ChatML-like, with the tokenizer's [SEP] closing each turn).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 Llama causal LM (random weights) saved with the MiniLM tokenizer, [SEP] as EOS and a chat template."""
    from tiny_models import minilm_llama

    from lightning_peft import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    minilm_llama(seed=0).save_pretrained(path)
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer.eos_token = "[SEP]"
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def instructions_jsonl(tmp_path_factory) -> str:
    """40 short {prompt, completion} records in a .jsonl file."""
    import json

    path = tmp_path_factory.mktemp("instructions") / "records.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def preferences_jsonl(tmp_path_factory) -> str:
    """40 short {prompt, chosen, rejected} pairs in a .jsonl file: the answer the prompt asks for is preferred."""
    import json

    path = tmp_path_factory.mktemp("preferences") / "pairs.jsonl"
    rows = [{"prompt": f"Say {w} to question {i}.", "chosen": w, "rejected": "no" if w == "yes" else "yes"}
            for i in range(20) for w in ("yes", "no")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides) -> the train config, run directory set to a temporary folder."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def tiny_overrides(model_dir: str) -> list[str]:
    """Overrides that make the default job run in seconds on the tiny model."""
    return [
        f"model.name_or_path={model_dir}",
        "data.train_size=32",
        "data.val_size=16",
        "data.max_length=32",
        "data.batch_size=8",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint=null",
        "callbacks.progress_bar=null",
    ]


def reviews_overrides(tmp_path: Path) -> list[str]:
    """Overrides for a learnable 2-class table (one word tells the class) instead of BBC News."""
    rows = ["text,label"] + [f"review {i} was {'good' if i % 2 else 'bad'}{' really' * (i % 5)},{'pos' if i % 2 else 'neg'}" for i in range(80)]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    return ["data=table", f"data.dataset_kwargs.path={tmp_path / 'reviews.csv'}"]


def assert_learned(run_dir: Path) -> None:
    """The held-out loss fell from the first epoch to the last, and the last accuracy is above chance (2 classes)."""
    history = [(h["val/loss"], h["val/acc"]) for h in json.loads((run_dir / "metrics.json").read_text())["history"]]
    assert len(history) >= 2 and history[-1][0] < history[0][0] and history[-1][1] > 0.5, history


def tiny_llm_overrides(model_dir: str, records: str) -> list[str]:
    """Overrides that make the causal-LM job run in seconds on the tiny Llama and a small record file."""
    return [
        "model=smollm2",
        "data=instructions",
        f"model.name_or_path={model_dir}",
        "model.max_new_tokens=4",
        f"data.train={records}",
        "data.train_size=16",
        "data.max_length=48",
        "data.batch_size=4",
        "data.generate_size=4",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint=null",
        "callbacks.progress_bar=null",
    ]


def tiny_dpo_overrides(model_dir: str, pairs: str) -> list[str]:
    """Overrides that make the DPO job run in seconds on the tiny Llama and a small pair file."""
    return [
        "model=smollm2_dpo",
        "data=preferences",
        f"model.name_or_path={model_dir}",
        "model.max_new_tokens=4",
        f"data.train={pairs}",
        "data.train_size=16",
        "data.val_size=8",
        "data.max_length=32",
        "data.batch_size=4",
        "data.generate_size=0",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint=null",
        "callbacks.progress_bar=null",
    ]


def tiny_vision_overrides() -> list[str]:
    """Overrides that make the vision job (EfficientNet-Lite0 on MNIST 5k) run in seconds: random weights, 32 px."""
    return [
        "model=efficientnet_lite0",
        "data=mnist5k",
        "model.pretrained=false",
        "data.train_size=20",
        "data.val_size=10",
        "data.image_size=32",
        "data.batch_size=10",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint=null",
        "callbacks.progress_bar=null",
    ]
