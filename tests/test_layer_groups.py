"""layer_groups on real model classes: order, names, every parameter exactly once, explicit patterns, errors."""

import pytest
import timm
import torchvision
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from lightning_peft import format_layer_groups, layer_groups

SMALL = dict(num_attention_heads=2, intermediate_size=32)


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def _check_partition(model, groups):
    names = [n for g in groups for n in g.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    assert sum(g.numel for g in groups) == sum(p.numel() for p in model.parameters())


CASES = {
    "bert+user head": (
        lambda: Holder(backbone=BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, **SMALL)), head=nn.Linear(16, 2)),
        ["backbone.embeddings", "backbone.encoder.layer.0", "backbone.encoder.layer.1", "backbone.encoder.layer.2", "head"],
    ),
    "bert for classification": (
        lambda: Holder(m=BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_labels=3, **SMALL))),
        ["m.bert.embeddings", "m.bert.encoder.layer.0", "m.bert.encoder.layer.1", "head"],
    ),
    "distilbert": (
        lambda: Holder(m=DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32))),
        ["m.distilbert.embeddings", "m.distilbert.transformer.layer.0", "m.distilbert.transformer.layer.1", "head"],
    ),
    "gpt2 (tied head)": (
        lambda: Holder(m=GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2))),
        ["m.transformer.wte+wpe", "m.transformer.h.0", "m.transformer.h.1"],
    ),
    "llama (untied lm_head is pretrained: joins the top block)": (
        lambda: Holder(m=LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, tie_word_embeddings=False, **SMALL))),
        ["m.model.embed_tokens", "m.model.layers.0", "m.model.layers.1"],
    ),
    "resnet18 (torchvision)": (
        lambda: Holder(net=torchvision.models.resnet18(num_classes=3)),
        ["net.conv1+bn1", "net.layer1", "net.layer2", "net.layer3", "net.layer4", "head"],
    ),
    "resnet18 (timm group_matcher)": (
        lambda: Holder(net=timm.create_model("resnet18", pretrained=False, num_classes=3)),
        ["net.conv1+bn1", "net.layer1", "net.layer2", "net.layer3", "net.layer4", "head"],
    ),
    "vit (timm group_matcher)": (
        lambda: Holder(net=timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2, img_size=32, patch_size=8)),
        ["net.cls_token+pos_embed+patch_embed", "net.blocks.0", "net.blocks.1+norm", "head"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_groups_found_in_order(case):
    build, expected = CASES[case]
    model = build()
    groups = layer_groups(model)
    assert [g.name for g in groups] == expected
    _check_partition(model, groups)
    assert [g.is_head for g in groups] == [name == "head" for name in expected]


def test_untied_lm_head_rides_with_the_top_block():
    model = Holder(m=LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, tie_word_embeddings=False, **SMALL)))
    top = layer_groups(model)[-1]
    assert not top.is_head and top.params[-2:] == ("m.model.norm.weight", "m.lm_head.weight")


def test_vit_from_transformers_and_final_norm_joins_last_block():
    model = Holder(m=ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=2, image_size=32, patch_size=8, num_labels=3, **SMALL)))
    groups = layer_groups(model)
    assert len(groups) == 4 and groups[0].name.endswith("embeddings") and groups[-1].name == "head"
    assert any(n.startswith("m.vit.layernorm.") for n in groups[2].params)  # final norm rides with the top block
    assert all(n.startswith("m.classifier.") for n in groups[-1].params)


def test_bert_pooler_joins_the_top_block():
    model = Holder(backbone=BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, **SMALL)), head=nn.Linear(16, 2))
    top = layer_groups(model)[-2]
    assert "backbone.pooler.dense.weight" in top.params and top.name == "backbone.encoder.layer.1"


def test_explicit_patterns_and_rest_is_head():
    model = Holder(net=torchvision.models.resnet18(num_classes=3))
    groups = layer_groups(model, patterns=[["net.conv1", "net.bn1"], "re:net\\.layer[12]", "re:net\\.layer[34]"])
    assert [g.name for g in groups] == ["net.conv1+net.bn1", "re:net\\.layer[12]", "re:net\\.layer[34]", "head"]
    assert groups[-1].params == ("net.fc.weight", "net.fc.bias")
    _check_partition(model, groups)


def test_pattern_matching_nothing_lists_modules_and_groups():
    model = Holder(net=torchvision.models.resnet18(num_classes=3))
    with pytest.raises(ValueError, match=r"'layer9' matched no module.*'net.layer1'.*Layer groups found automatically: .*'net.layer4'"):
        layer_groups(model, patterns=["layer1", "layer9"])


def test_overlapping_patterns_are_rejected():
    model = Holder(net=torchvision.models.resnet18(num_classes=3))
    with pytest.raises(ValueError, match="net.layer1.0.conv1.weight.*must belong to one group"):
        layer_groups(model, patterns=["layer1", "re:net\\.layer1\\.0"])


def test_unknown_model_without_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="No pretrained backbone found.*backbone=\\[...\\]"):
        layer_groups(Holder(a=nn.Linear(2, 2), b=nn.Linear(2, 2)))


def test_backbone_named_by_pattern_is_split_into_children():
    model = Holder(encoder=nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))), head=nn.Linear(4, 2))
    groups = layer_groups(model, backbone="encoder")
    assert [g.name for g in groups] == ["encoder.0", "encoder.2", "head"]


def test_table_shows_groups_counts_and_trainable():
    model = Holder(net=torchvision.models.resnet18(num_classes=3))
    model.net.layer1.requires_grad_(False)
    table = format_layer_groups(model, layer_groups(model))
    line = next(row for row in table.splitlines() if "net.layer1" in row)
    assert "147,968" in line and line.rstrip().endswith(" 0")
    assert "head" in table and "1,539" in table
