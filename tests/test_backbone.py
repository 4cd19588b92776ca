import pytest
import timm
import torchvision
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from lightning_peft import find_backbone

TINY = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def test_hf_sequence_classifier_backbone_is_its_base_model():
    split = find_backbone(Holder(model=BertForSequenceClassification(BertConfig(**TINY, num_labels=3))))
    assert split.backbone == ("model.bert",) and split.head == ()


def test_hf_base_model_with_user_head():
    split = find_backbone(Holder(backbone=BertModel(BertConfig(**TINY)), head=nn.Linear(16, 2)))
    assert split.backbone == ("backbone",)


def test_timm_model_keeps_its_classifier_as_head():
    split = find_backbone(Holder(net=timm.create_model("resnet18", pretrained=False, num_classes=3)))
    assert split.backbone == ("net",) and split.head == ("net.fc",)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8)
    assert find_backbone(Holder(net=vit)).head == ("net.head",)


def test_torchvision_model_keeps_its_classifier_as_head():
    assert find_backbone(Holder(net=torchvision.models.resnet18(num_classes=3))).head == ("net.fc",)
    assert find_backbone(Holder(net=torchvision.models.mobilenet_v3_small(num_classes=3))).head == ("net.classifier",)


def test_explicit_patterns_override_detection():
    holder = Holder(a=nn.Linear(2, 2), b=nn.Linear(2, 2))
    assert find_backbone(holder, backbone=["a"]).backbone == ("a",)


def test_unknown_model_names_top_level_modules():
    with pytest.raises(ValueError, match=r"No pretrained backbone.*backbone=\[\.\.\.\].*'encoder', 'classifier'"):
        find_backbone(Holder(encoder=nn.Linear(2, 2), classifier=nn.Linear(2, 2)))


def test_bare_pretrained_model_has_nothing_left_to_train():
    with pytest.raises(ValueError, match="nothing to train"):
        find_backbone(BertModel(BertConfig(**TINY)))
