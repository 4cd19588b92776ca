"""FreezeBackbone on unchanged user modules: frozen weights bit-identical, heads train, BN handled."""

import pytest
import torch
import torchvision
from helpers import VisionClassifier, fit, image_loader, snapshot
from torch import nn

from lightning_peft import FreezeBackbone


def _resnet() -> VisionClassifier:
    torch.manual_seed(0)
    return VisionClassifier(torchvision.models.resnet18(num_classes=3))


def _bn(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_linear_probe_leaves_backbone_and_bn_statistics_bit_identical():
    model = _resnet()
    before = snapshot(model)
    fit(model, image_loader(), [FreezeBackbone()])
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.fc.weight", "net.fc.bias"}
    assert all(not m.training for m in _bn(model.net))
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("net.fc."))


def test_train_bn_lets_batchnorm_train_and_keeps_convolutions_frozen():
    model = _resnet()
    before = snapshot(model)
    fit(model, image_loader(), [FreezeBackbone(train_bn=True)])
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "net.bn1.running_mean" in changed and "net.bn1.weight" in changed and "net.fc.weight" in changed
    assert not any("conv" in k or "downsample.0" in k for k in changed)


def test_without_callback_everything_trains():
    model = _resnet()
    before = snapshot(model)
    fit(model, image_loader())
    after = snapshot(model)
    assert not torch.equal(before["net.conv1.weight"], after["net.conv1.weight"])


def test_freezing_everything_is_an_error():
    model = VisionClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)))
    with pytest.raises(ValueError, match="left nothing to train"):
        fit(model, image_loader(), [FreezeBackbone(backbone=["net"])])


def test_unknown_backbone_pattern_lists_module_names():
    with pytest.raises(ValueError, match=r"'nope' matched no module.*'net.conv1'"):
        fit(_resnet(), image_loader(), [FreezeBackbone(backbone="nope")])
