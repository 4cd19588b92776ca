"""Each wrapped layer type against the plain math; zero change at init; merge/unmerge round trips."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from tiny_models import MODELS, output, randomize
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import (
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    adapter_batch,
    inject,
    merge,
    merge_and_unload,
    unmerge,
)


def holder(**layers: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(layers))


def _random_lora(layer) -> tuple[torch.Tensor, torch.Tensor]:
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.lora_A.normal_()
        adapter.lora_B.normal_()
    return adapter.lora_A.detach(), adapter.lora_B.detach()


def test_lora_linear_is_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    model = holder(fc=nn.Linear(13, 11))
    w, b = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    inject(model, LoRAConfig(r=3, alpha=6.0, target_modules=["fc"], modules_to_save=None))
    a, bb = _random_lora(model.fc)
    x = torch.randn(2, 5, 13)
    expected = x @ w.T + b + (6.0 / 3) * (x @ a.T) @ bb.T
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_conv1d_gpt2_layout():
    torch.manual_seed(0)
    model = holder(c_attn=Conv1D(9, 7))  # nf=9 outputs, nx=7 inputs; weight stored (in, out)
    w, b = model.c_attn.weight.detach().clone(), model.c_attn.bias.detach().clone()
    inject(model, LoRAConfig(r=2, alpha=4.0, target_modules=["c_attn"], modules_to_save=None))
    a, bb = _random_lora(model.c_attn)
    assert a.shape == (2, 7) and bb.shape == (9, 2)  # the same shapes as for nn.Linear(7, 9), as PEFT stores them
    x = torch.randn(3, 4, 7)
    torch.testing.assert_close(model(x), x @ w + b + 2.0 * (x @ a.T) @ bb.T, rtol=1e-5, atol=1e-5)


def test_lora_conv2d_equals_a_conv_with_the_composite_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, kernel_size=3, stride=2, padding=1)
    model = holder(conv=conv)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    inject(model, LoRAConfig(r=4, alpha=8.0, target_modules=["conv"], modules_to_save=None))
    a, bb = _random_lora(model.conv)
    assert a.shape == (4, 5, 3, 3) and bb.shape == (6, 4, 1, 1)
    composite = torch.einsum("or,rikl->oikl", bb[:, :, 0, 0], a) * 2.0  # sum_j B[o, j] A[j, i]
    x = torch.randn(2, 5, 9, 9)
    expected = F.conv2d(x, w + composite, b, stride=2, padding=1)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_lora_embedding_adds_rows_of_the_low_rank_table():
    torch.manual_seed(0)
    model = holder(emb=nn.Embedding(17, 8, padding_idx=0))
    w = model.emb.weight.detach().clone()
    inject(model, LoRAConfig(r=3, alpha=3.0, target_modules=["emb"], modules_to_save=None))
    a, bb = _random_lora(model.emb)
    assert a.shape == (3, 17) and bb.shape == (8, 3)
    ids = torch.tensor([[0, 5, 16], [3, 3, 1]])
    torch.testing.assert_close(model(ids), w[ids] + (a.T[ids] @ bb.T) * 1.0, rtol=1e-5, atol=1e-5)


def test_rslora_scale_and_per_module_rank_and_alpha_overrides():
    model = holder(a=nn.Linear(8, 8), b=nn.Linear(8, 8))
    config = LoRAConfig(r=4, alpha=8.0, use_rslora=True, rank_pattern={"b": 2}, alpha_pattern={"re:b": 1.0}, target_modules=["a", "b"], modules_to_save=None)
    inject(model, config)
    first, second = model.a.adapters["default"], model.b.adapters["default"]
    assert first.lora_A.shape[0] == 4 and first.scale == pytest.approx(8.0 / math.sqrt(4))
    assert second.lora_A.shape[0] == 2 and second.scale == pytest.approx(1.0 / math.sqrt(2))


def test_lora_bias_option_trains_a_bias_delta_of_wrapped_layers():
    model = holder(fc=nn.Linear(6, 4), norm=nn.LayerNorm(4))
    inject(model, LoRAConfig(r=2, target_modules=["fc"], bias="lora_only", modules_to_save=None))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.adapters.default.lora_A", "fc.adapters.default.lora_B", "fc.adapters.default.bias_delta"}
    other = holder(fc=nn.Linear(6, 4), norm=nn.LayerNorm(4))
    inject(other, LoRAConfig(r=2, target_modules=["fc"], bias="all", modules_to_save=None))
    assert "norm.adapters.default.bias_delta" in {n for n, p in other.named_parameters() if p.requires_grad}


def test_lora_dropout_applies_to_the_branch_input_only_in_training():
    torch.manual_seed(0)
    model = holder(fc=nn.Linear(16, 4))
    inject(model, LoRAConfig(r=2, dropout=0.5, target_modules=["fc"], modules_to_save=None))
    _random_lora(model.fc)
    x = torch.randn(64, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    with torch.no_grad():
        model.fc.adapters["default"].lora_B.zero_()
    assert torch.equal(model(x), model.fc.base_layer(x))  # base path never sees dropout


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_scales_output_or_input(kind, feedforward):
    torch.manual_seed(0)
    layer = nn.Linear(7, 5) if kind == "linear" else Conv1D(5, 7)
    model = holder(proj=layer)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    inject(model, IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else None, modules_to_save=None))
    l = model.proj.adapters["default"].ia3_l
    assert l.shape == ((7,) if feedforward else (5,)) and torch.equal(l, torch.ones_like(l))
    with torch.no_grad():
        l.uniform_(0.5, 1.5)
    x = torch.randn(3, 2, 7)
    plain = (lambda v: v @ w.T + b) if kind == "linear" else (lambda v: v @ w + b)
    expected = plain(x * l) if feedforward else plain(x) * l
    torch.testing.assert_close(model(x), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(6, 4), torch.randn(3, 6)),
    (nn.LayerNorm(6), torch.randn(2, 5, 6)),
    (nn.Conv2d(3, 4, 3), torch.randn(2, 3, 7, 7)),
    (nn.BatchNorm2d(3), torch.randn(2, 3, 5, 5)),
    (Conv1D(4, 6), torch.randn(2, 6)),
])
def test_bitfit_adds_a_trainable_delta_to_the_bias(layer, x):
    layer.eval()
    reference = layer(x).detach()
    model = holder(layer=layer)
    inject(model, BitFitConfig(target_modules=["layer"], modules_to_save=None))
    delta = model.layer.adapters["default"].bias_delta
    assert torch.equal(model(x), reference)
    with torch.no_grad():
        delta.normal_()
    shape = (-1, 1, 1) if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)) else (-1,)
    torch.testing.assert_close(model(x), reference + delta.detach().view(shape))
    model(x).sum().backward()
    assert delta.grad is not None and layer.bias.grad is None  # the delta trains, the pretrained bias stays frozen


# --- real models: unchanged at init, merged == unmerged, unmerge restores the base ----------------

METHOD_CASES = {
    "lora-bert": ("bert", lambda: LoRAConfig(r=4, target_modules=["query", "value", "word_embeddings"])),
    "lora-gpt2": ("gpt2", lambda: LoRAConfig(r=4)),  # default: c_attn (Conv1D)
    "lora-llama": ("llama", lambda: LoRAConfig(r=4, target_modules="all-linear")),
    "lora-vit-timm": ("vit", lambda: LoRAConfig(r=4)),  # default: qkv
    "lora-resnet-conv": ("resnet", lambda: LoRAConfig(r=4, target_modules=[r"re:layer\d\.\d\.conv[12]"], bias="lora_only")),
    "ia3-bert": ("bert", lambda: IA3Config()),
    "ia3-gpt2": ("gpt2", lambda: IA3Config()),
    "ia3-llama": ("llama", lambda: IA3Config()),
    "bitfit-bert": ("bert", lambda: BitFitConfig()),
    "bitfit-resnet": ("resnet", lambda: BitFitConfig()),
}


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_unchanged_at_init_and_merge_unmerge_round_trip(case):
    name, make_config = METHOD_CASES[case]
    factory, batch = MODELS[name]
    model = factory()
    x = batch()
    with torch.no_grad():
        reference = output(model, x)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        inject(model, make_config())
        assert torch.equal(output(model, x), reference), "the adapter must start as the identity"
        randomize(model)
        adapted = output(model, x)
        assert not torch.allclose(adapted, reference, atol=1e-4)
        merge(model)
        torch.testing.assert_close(output(model, x), adapted, rtol=1e-4, atol=1e-4)
        unmerge(model)
        torch.testing.assert_close(output(model, x), adapted, rtol=1e-5, atol=1e-5)
        restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
        for key, value in base.items():
            torch.testing.assert_close(restored[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_merge_and_unload_gives_plain_layers_and_the_same_outputs():
    model = MODELS["bert"][0]()
    x = MODELS["bert"][1]()
    inject(model, LoRAConfig(r=4))
    randomize(model)
    with torch.no_grad():
        adapted = output(model, x)
        merge_and_unload(model)
        torch.testing.assert_close(output(model, x), adapted, rtol=1e-4, atol=1e-4)
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert type(model.classifier) is nn.Linear  # the trained copy of the head replaced the original


def _lora_leaves(layer) -> dict[str, torch.Tensor]:
    """Fresh leaf copies of the tensors the layer computes with (bias = base bias + the LoRA bias delta)."""
    adapter = layer.adapters["default"]
    bias = layer.base_layer.bias.detach() + adapter.bias_delta.detach()
    return {k: v.detach().clone().requires_grad_() for k, v in
            dict(weight=layer.base_layer.weight, bias=bias, lora_a=adapter.lora_A, lora_b=adapter.lora_B).items()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_layer_output_and_gradients_are_the_reference(dropout):
    """What the layer runs off-GPU computes ``kernels.lora_linear_reference``: same output and gradients on the same tensors."""
    from lightning_peft.kernels import lora_linear_reference

    torch.manual_seed(0)
    model = holder(fc=nn.Linear(41, 37))
    inject(model, LoRAConfig(r=5, alpha=10.0, dropout=dropout, target_modules=["fc"], modules_to_save=None, bias="lora_only"))
    model.fc.base_layer.requires_grad_(True)
    randomize(model)
    leaves = _lora_leaves(model.fc)
    x = torch.randn(3, 9, 41, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(3, 9, 37)
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)  # the same dropout mask
    y_ref = lora_linear_reference(x_ref, leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], 2.0, dropout)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # the same dropout mask: else far off
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    adapter = model.fc.adapters["default"]
    got = dict(x=x.grad, weight=model.fc.base_layer.weight.grad, bias=adapter.bias_delta.grad, lora_a=adapter.lora_A.grad, lora_b=adapter.lora_B.grad)
    for name, grad in got.items():
        torch.testing.assert_close(grad, x_ref.grad if name == "x" else leaves[name].grad, rtol=1e-5, atol=1e-5, msg=name)


def test_lora_linear_layer_keeps_triton_out_when_kernels_are_off(monkeypatch):
    from lightning_peft.kernels import dispatch, use_kernels

    model = holder(fc=nn.Linear(8, 6))
    inject(model, LoRAConfig(r=2, target_modules=["fc"], modules_to_save=None))
    calls, routes = [], []
    real, real_route = dispatch.lora_linear_multi, dispatch.lora_route
    monkeypatch.setattr(dispatch, "lora_linear_multi", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    monkeypatch.setattr(dispatch, "lora_route", lambda *a: routes.append(real_route(*a)) or routes[-1])
    x = torch.randn(4, 8)
    model(x)  # CPU: the kernels do not apply
    with use_kernels(False):
        model(x)
    assert routes == ["torch", "torch"]
    model.fc.configs["default"].use_kernels = False
    model(x)
    assert calls == [True, True, False]
    with adapter_batch(model, ["default", None, "default", None]):  # per-sample routing: the same entry
        model(x)
    assert calls == [True, True, False, False]


def test_lora_layer_runs_the_fused_kernel_when_it_applies(monkeypatch):
    """The layer's kernel path (real Triton kernel; on CPU through the interpreter) equals its eager path."""
    pytest.importorskip("triton")
    from lightning_peft.kernels import dispatch

    torch.manual_seed(0)
    model = holder(fc=nn.Linear(41, 37))
    inject(model, LoRAConfig(r=5, alpha=10.0, target_modules=["fc"], modules_to_save=None, bias="lora_only"))
    randomize(model)
    x = torch.randn(3, 9, 41, requires_grad=True)
    eager = model(x)
    eager.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad} | {"x": x.grad.clone()}
    for p in [*model.parameters(), x]:
        p.grad = None
    calls = []
    real = dispatch.lora_linear_triton
    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: True)  # the interpreter stands in for a GPU
    monkeypatch.setenv(dispatch.PATH_ENV_VAR, "fused")  # fp32 would take the cuBLAS-backed path
    monkeypatch.setattr(dispatch, "lora_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = model(x)
    fused.square().sum().backward()
    assert calls == [1]
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-3, msg=name)
    torch.testing.assert_close(x.grad, expected["x"], rtol=1e-3, atol=1e-3)
    calls.clear()
    model.fc.configs["default"].use_kernels = False
    model(x)
    assert calls == []
