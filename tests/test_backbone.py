import pytest
import timm
import tiny_models
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


# --- one definition of the head: every feature agrees --------------------------------------------

class BodyAndHead(nn.Module):
    """A user's module (knows nothing of lightning_peft): a named body, a neck without parameters and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.neck = nn.Dropout(0.1)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.neck(self.body(x)))


def _text_classifier(tiny_bert_dir):
    from lightning_peft import TextClassifier

    return TextClassifier(tiny_bert_dir, num_classes=2)


def _image_classifier(_):
    from lightning_peft import ImageClassifier

    return ImageClassifier("test_efficientnet", num_classes=3, pretrained=False)


HEADS = {
    # model kind: (build(tiny_bert_dir), backbone patterns, the head)
    "bert for classification": (lambda _: tiny_models.bert(), None, ["classifier"]),
    "gpt2 (tied lm_head)": (lambda _: Holder(lm=tiny_models.gpt2(), proj=nn.Linear(4, 4)), None, ["proj"]),
    "llama (untied lm_head is pretrained)": (lambda _: Holder(lm=tiny_models.llama(), proj=nn.Linear(4, 4)), None, ["proj"]),
    "TextClassifier": (_text_classifier, None, ["head"]),
    "ImageClassifier (timm)": (_image_classifier, None, ["backbone.classifier"]),
    "timm vit": (lambda _: Holder(net=tiny_models.vit()), None, ["net.head"]),
    "torchvision resnet": (lambda _: tiny_models.resnet(), None, ["fc"]),
    "user body + head": (lambda _: BodyAndHead(), "body", ["head"]),
}


@pytest.mark.parametrize("kind", list(HEADS))
def test_every_feature_agrees_on_the_head(kind, tiny_bert_dir):
    from lightning_peft import L2SP, LoRAConfig, find_feature_point, layer_groups
    from lightning_peft.groups.backbone import find_head, head_parameters
    from lightning_peft.peft.targeting import resolve_modules_to_save

    build, backbone, expected = HEADS[kind]
    model = build(tiny_bert_dir)
    assert find_head(model, backbone) == expected
    in_head = sorted(n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in expected))
    assert sorted(head_parameters(model, backbone)) == in_head
    groups = layer_groups(model, backbone=backbone)
    assert sorted(n for g in groups if g.is_head for n in g.params) == in_head
    assert groups[-1].is_head and groups[-1].name == "head"
    l2sp = L2SP(backbone=backbone)
    l2sp.setup(None, model, "fit")
    assert sorted(l2sp.head_params) == in_head
    assert find_feature_point(model, backbone=backbone).head == expected[0]
    if backbone is None:  # PEFT finds the backbone itself
        assert resolve_modules_to_save(model, LoRAConfig()) == expected


@pytest.mark.parametrize("build", [tiny_models.gpt2, tiny_models.llama])
def test_a_language_model_has_no_head(build):
    from lightning_peft import layer_groups
    from lightning_peft.groups.backbone import find_head, head_parameters

    model = build()
    assert find_head(model) == [] and head_parameters(model) == []
    assert not any(g.is_head for g in layer_groups(model))
