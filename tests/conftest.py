"""Shared fixtures: offline settings, a tiny random BERT with a real tokenizer, Hydra composition."""

from __future__ import annotations

import os

import torch

# The Triton kernel tests run the real kernels on CPU through Triton's interpreter. triton reads
# TRITON_INTERPRET when a kernel is decorated, i.e. when lightning_peft.kernels.lora/bottleneck are
# first imported, so it is set here before any test module imports them (importing torch does not
# import triton). On a CUDA machine the kernels run natively.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
# On a GPU, launch each kernel with its first autotune config instead of timing every config for
# every test shape (the benchmark script autotunes).
os.environ.setdefault("LIGHTNING_PEFT_AUTOTUNE", "0")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

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
