"""Every method's config refuses values that are non-finite, of the wrong type or meaningless, naming the field."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_peft import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    QLoRAConfig,
    inject,
)

NAN, INF = float("nan"), float("inf")

CASES = [
    (LoRAConfig, dict(alpha=0), r"alpha=0 is invalid: .*> 0 .*never trains"),
    (LoRAConfig, dict(alpha=-2.0), r"alpha=-2.0 is invalid"),
    (LoRAConfig, dict(alpha=NAN), r"alpha must be a finite number, got nan"),
    (LoRAConfig, dict(alpha=INF), r"alpha must be a finite number, got inf"),
    (LoRAConfig, dict(r="8"), r"r must be an integer, got '8' \(str\)"),
    (LoRAConfig, dict(r=2.5), r"r must be an integer, got 2.5"),
    (LoRAConfig, dict(r=True), r"r must be an integer, got True \(bool\)"),
    (LoRAConfig, dict(r=0), r"r=0 is invalid: the rank must be an integer >= 1"),
    (LoRAConfig, dict(rank_pattern={"query": 0}), r"rank_pattern\['query'\]=0 is invalid"),
    (LoRAConfig, dict(rank_pattern={"query": "4"}), r"rank_pattern\['query'\] must be an integer"),
    (LoRAConfig, dict(alpha_pattern={"query": NAN}), r"alpha_pattern\['query'\] must be a finite number"),
    (LoRAConfig, dict(alpha_pattern={"query": 0.0}), r"alpha_pattern\['query'\]=0.0 is invalid"),
    (LoRAConfig, dict(dropout=NAN), r"dropout must be a finite number, got nan"),
    (LoRAConfig, dict(dropout=1.0), r"dropout=1.0 is invalid: it must be in \[0, 1\)"),
    (LoRAConfig, dict(use_rslora="false"), r"use_rslora must be True or False, got 'false'"),
    (LoRAConfig, dict(bias="some"), r"unknown bias='some'; choose one of \['none', 'lora_only', 'all'\]"),
    (QLoRAConfig, dict(int8_threshold=NAN), r"QLoRAConfig: int8_threshold must be a finite number"),
    (QLoRAConfig, dict(alpha=0), r"QLoRAConfig: alpha=0 is invalid"),
    (AdapterConfig, dict(scale=0.0), r"AdapterConfig: scale=0 is invalid"),
    (AdapterConfig, dict(scale=NAN), r"AdapterConfig: scale must be a finite number"),
    (AdapterConfig, dict(reduction_factor=INF), r"reduction_factor must be a finite number"),
    (AdapterConfig, dict(bottleneck_size="8"), r"bottleneck_size must be an integer"),
    (AdapterConfig, dict(dropout=NAN), r"dropout must be a finite number"),
    (IA3Config, dict(init_ones="yes"), r"IA3Config: init_ones must be True or False"),
    (PromptTuningConfig, dict(num_virtual_tokens="5"), r"num_virtual_tokens must be an integer, got '5'"),
    (PromptTuningConfig, dict(num_virtual_tokens=0), r"num_virtual_tokens=0 is invalid"),
    (PromptTuningConfig, dict(init="zeros"), r"unknown init='zeros'; choose one of \['random', 'vocab', 'text'\]"),
    (PTuningConfig, dict(dropout=-0.1), r"PTuningConfig: dropout=-0.1 is invalid: it must be in \[0, 1\)"),
    (PTuningConfig, dict(encoder_hidden=0), r"encoder_hidden=0 is invalid"),
    (PTuningConfig, dict(encoder="gru"), r"unknown encoder='gru'; choose one of \['lstm', 'mlp'\]"),
    (PrefixTuningConfig, dict(dropout=NAN), r"PrefixTuningConfig: dropout must be a finite number"),
    (PrefixTuningConfig, dict(projection_hidden=0), r"projection_hidden=0 is invalid"),
    (PTuningV2Config, dict(projection="no"), r"PTuningV2Config: projection must be True or False"),
]


@pytest.mark.parametrize("cls, kwargs, match", CASES, ids=[f"{c.__name__}-{next(iter(k))}-{i}" for i, (c, k, _) in enumerate(CASES)])
def test_invalid_values_are_refused_naming_the_field(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_valid_yaml_style_values_are_accepted_and_normalised():
    config = LoRAConfig(r=8.0, alpha=16, rank_pattern={"query": 4.0}, dropout=0)
    assert config.r == 8 and type(config.r) is int and type(config.rank_pattern["query"]) is int
    assert LoRAConfig.from_dict(config.to_dict()) == config
    assert PromptTuningConfig(num_virtual_tokens=5.0).num_virtual_tokens == 5
    assert PTuningConfig(encoder_hidden=None).encoder_hidden is None


def test_rank_above_the_layer_width_warns_with_a_hint():
    model = nn.Sequential(OrderedDict(small=nn.Linear(6, 4), big=nn.Linear(32, 32)))
    with pytest.warns(UserWarning, match=r"1 layer\(s\): small \(r=8, 6 -> 4\)\..*HINT: lower r.*rank_pattern"):
        inject(model, LoRAConfig(r=8, target_modules=["small", "big"], modules_to_save=None))
    model = nn.Sequential(OrderedDict(small=nn.Linear(6, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(model, LoRAConfig(r=8, rank_pattern={"small": 4}, target_modules=["small"], modules_to_save=None))
    assert model.small.adapters["default"].lora_A.shape == (4, 6)
    torch.testing.assert_close(model(torch.ones(1, 6)), model.small.base_layer(torch.ones(1, 6)))
