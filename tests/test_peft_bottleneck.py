"""Bottleneck adapters: placement per architecture, bit-exact identity at init, the math of each mode,
what trains, merge refusal, save/load, layer selection, several adapters and mixed batches."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from tiny_models import MODELS, bert, gpt2, llama, output, randomize, token_batch
from torch import nn

from lightning_peft import (
    AdapterConfig,
    LoRAConfig,
    adapter_batch,
    count_parameters,
    delete_adapter,
    disable_adapters,
    inject,
    list_adapters,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
)
from lightning_peft.peft import AdapterLayer
from lightning_peft.peft.bottleneck import BottleneckLayer


def sites(model: nn.Module) -> dict[str, str]:
    """Wrapped module name -> mode of its (single) adapter."""
    return {n: m.adapters["default"].mode for n, m in model.named_modules() if isinstance(m, BottleneckLayer)}


# --- placement ------------------------------------------------------------------------------------

EXPECTED = {
    ("bert", "houlsby"): {f"bert.encoder.layer.{i}.{p}": "output" for i in (0, 1) for p in ("attention.output.dense", "output.dense")},
    ("bert", "pfeiffer"): {f"bert.encoder.layer.{i}.output.dense": "output" for i in (0, 1)},
    ("bert", "parallel"): {f"bert.encoder.layer.{i}.output": "residual_arg" for i in (0, 1)},
    ("gpt2", "houlsby"): {f"transformer.h.{i}.{p}": "output" for i in (0, 1) for p in ("attn.c_proj", "mlp.c_proj")},
    ("gpt2", "pfeiffer"): {f"transformer.h.{i}.mlp.c_proj": "output" for i in (0, 1)},
    ("gpt2", "parallel"): {f"transformer.h.{i}.mlp": "parallel" for i in (0, 1)},
    ("llama", "houlsby"): {f"model.layers.{i}.{p}": "output" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")},
    ("llama", "pfeiffer"): {f"model.layers.{i}.mlp.down_proj": "output" for i in (0, 1)},
    ("llama", "parallel"): {f"model.layers.{i}.mlp": "parallel" for i in (0, 1)},
    ("vit", "houlsby"): {f"blocks.{i}.{p}": "output" for i in (0, 1) for p in ("attn.proj", "mlp.fc2")},
    ("vit", "pfeiffer"): {f"blocks.{i}.mlp.fc2": "output" for i in (0, 1)},
    ("vit", "parallel"): {f"blocks.{i}.mlp": "parallel" for i in (0, 1)},
}


@pytest.mark.parametrize("arch,placement", list(EXPECTED))
def test_placement_per_architecture_and_bit_exact_identity_at_init(arch, placement):
    factory, batch = MODELS[arch]
    model, x = factory(), batch()
    with torch.no_grad():
        before = output(model, x)
    inject(model, AdapterConfig(placement=placement, reduction_factor=8))
    assert sites(model) == EXPECTED[arch, placement]
    d = 192 if arch == "vit" else 32  # hidden width = FFN input/output width; m = d // 8
    per_adapter = (d // 8) * d + d // 8 + d * (d // 8) + d  # down (m x d + m) + up (d x m + d)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".adapters.default." in n and "down" not in n and "up" not in n)
    assert count_parameters(model).trainable == len(EXPECTED[arch, placement]) * per_adapter + head
    with torch.no_grad():
        assert torch.equal(output(model, x), before)  # W_up = 0: bit-exactly the base model
        randomize(model)
        assert not torch.allclose(output(model, x), before)


def test_hf_vit_and_distilbert_layouts():
    from transformers import DistilBertConfig, DistilBertModel, ViTConfig, ViTModel

    vit_hf = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=16, patch_size=8))
    holder = nn.Sequential(OrderedDict(vit=vit_hf, head=nn.Linear(32, 2)))
    inject(holder, AdapterConfig(placement="houlsby"))
    assert sorted(sites(holder)) == sorted(f"vit.layers.{i}.{p}" for i in (0, 1) for p in ("attention.o_proj", "mlp.fc2"))
    distil = nn.Sequential(OrderedDict(enc=DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=48)), head=nn.Linear(32, 2)))
    inject(distil, AdapterConfig(placement="parallel", bottleneck_size=3))
    assert sites(distil) == {"enc.transformer.layer.0.ffn": "parallel", "enc.transformer.layer.1.ffn": "parallel"}
    assert distil.enc.transformer.layer[0].ffn.adapters["default"].down.weight.shape == (3, 32)


# --- the math of each mode -------------------------------------------------------------------------


def _random(layer: AdapterLayer, name: str = "default", seed: int = 0) -> nn.Module:
    adapter = layer.adapters[name]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


def _branch(adapter, x, act=F.gelu):
    return F.linear(act(F.linear(x, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)


def test_output_mode_is_residual_plus_scaled_bottleneck_of_the_layer_output():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(7, 9)))
    inject(model, AdapterConfig(target_modules=["fc"], bottleneck_size=3, activation="relu", scale=0.5, modules_to_save=None))
    adapter = _random(model.fc)
    x = torch.randn(2, 4, 7)
    y = model.fc.base_layer(x)
    torch.testing.assert_close(model(x), y + 0.5 * _branch(adapter, y, F.relu))


def test_parallel_mode_adds_a_branch_reading_the_module_input():
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    model = nn.Sequential(OrderedDict(ffn=ffn))
    inject(model, AdapterConfig(placement="parallel", target_modules=["ffn"], bottleneck_size=2, scale=4.0, modules_to_save=None))
    adapter = _random(model.ffn)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), ffn(x) + 4.0 * _branch(adapter, x))


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_bottleneck_layer_runs_the_fused_kernel_when_it_applies(monkeypatch, placement):
    """The layer's kernel path (real Triton kernels; on CPU through the interpreter) equals its eager path: the
    residual-is-x pass of a serial adapter and the separate-residual pass of a parallel one, outputs and gradients."""
    pytest.importorskip("triton")
    from lightning_peft.kernels import dispatch

    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(41, 24), nn.GELU(), nn.Linear(24, 41))
    model = nn.Sequential(OrderedDict(ffn=ffn))
    mode = {} if placement == "houlsby" else {"placement": "parallel"}  # target_modules given: an adapter after ffn's output
    inject(model, AdapterConfig(**mode, target_modules=["ffn"], bottleneck_size=5, scale=0.7, modules_to_save=None))
    _random(model.ffn)
    x = torch.randn(3, 9, 41, requires_grad=True)
    eager = model(x)
    eager.square().sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p.grad.clone() for n, p in trainable.items()} | {"x": x.grad.clone()}
    for p in [*model.parameters(), x]:
        p.grad = None
    calls = []
    real = dispatch.adapter_bottleneck_triton
    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: True)  # the interpreter stands in for a GPU
    monkeypatch.setattr(dispatch, "adapter_bottleneck_triton", lambda *a, **k: calls.append(k.get("residual", a[7] if len(a) > 7 else None)) or real(*a, **k))
    fused = model(x)
    fused.square().sum().backward()
    assert len(calls) == 1 and (calls[0] is None) == (placement == "houlsby")  # the serial adapter's residual-is-x pass
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert len(trainable) == 4
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(x.grad, expected["x"], rtol=1e-4, atol=1e-4)


def test_bert_parallel_branch_joins_before_the_residual_layernorm():
    model = bert()
    inject(model, AdapterConfig(placement="parallel", bottleneck_size=4))
    out = model.bert.encoder.layer[0].output
    adapter = _random(out)
    h, x = torch.randn(2, 5, 48), torch.randn(2, 5, 32)  # intermediate activations, FFN input (= the residual)
    base = out.base_layer
    expected = base.LayerNorm(base.dense(h) + _branch(adapter, x) + x)  # LayerNorm(ffn(x) + branch(x) + x)
    torch.testing.assert_close(out(h, x), expected)


def test_stacked_adapters_on_one_layer_apply_in_order_and_mixed_batches_route_per_sample():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(6, 6)))
    inject(model, AdapterConfig(target_modules=["fc"], bottleneck_size=2, modules_to_save=None), "a")
    inject(model, AdapterConfig(target_modules=["fc"], bottleneck_size=3, modules_to_save=None), "b")
    a, b = _random(model.fc, "a", 1), _random(model.fc, "b", 2)
    x = torch.randn(4, 6)
    y = model.fc.base_layer(x)
    ya, yb = y + _branch(a, y), y + _branch(b, y)
    set_adapter(model, ["a", "b"])
    torch.testing.assert_close(model(x), ya + _branch(b, ya))
    with adapter_batch(model, ["b", None, "a", "b"]):
        torch.testing.assert_close(model(x), torch.stack([yb[0], y[1], ya[2], yb[3]]))
    with disable_adapters(model):
        assert torch.equal(model(x), y)


# --- what trains, merging, files ---------------------------------------------------------------------


def test_only_adapter_parameters_get_gradients_and_the_base_stays_bit_identical():
    model = llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, AdapterConfig(placement="houlsby", bottleneck_size=4, modules_to_save=None))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)  # the user's optimizer takes everything
    x = token_batch()
    for _ in range(2):
        loss = F.cross_entropy(output(model, x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".adapters.default." in n and (".down." in n or ".up." in n) for n in grads)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert model.model.layers[0].mlp.down_proj.adapters["default"].up.weight.abs().sum() > 0


def test_merge_is_refused_before_anything_changes():
    model = bert()
    inject(model, LoRAConfig(r=2), "lora")
    inject(model, AdapterConfig(placement="pfeiffer"), "adapter")
    randomize(model)
    set_adapter(model, ["lora", "adapter"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: merge(model), lambda: merge_and_unload(model)):
        with pytest.raises(RuntimeError, match=r"Cannot merge: bert\.encoder\.layer\.0\.output\.dense: bottleneck adapters are nonlinear"):
            call()
        assert not any(m.merged for m in model.modules() if isinstance(m, AdapterLayer))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(RuntimeError, match="adapter 'adapter': bottleneck adapters are nonlinear"):
        model.bert.encoder.layer[0].output.dense.merge()  # the layer itself refuses too
    merge(model, ["lora"])  # LoRA alone still merges
    assert model.bert.encoder.layer[0].attention.self.query.merged == ("lora",)


@pytest.mark.parametrize("arch,placement", [("gpt2", "houlsby"), ("bert", "parallel"), ("vit", "pfeiffer")])
def test_save_then_load_into_a_fresh_base_gives_identical_outputs(arch, placement, tmp_path):
    factory, batch = MODELS[arch]
    model, x = factory(), batch()
    inject(model, AdapterConfig(placement=placement, bottleneck_size=5, activation="silu", scale=2.0))
    randomize(model)
    with torch.no_grad():
        expected = output(model, x)
    save_adapter(model, tmp_path)
    fresh = factory()
    load_adapter(fresh, tmp_path)
    assert sites(fresh) == sites(model)
    with torch.no_grad():
        assert torch.equal(output(fresh, x), expected)
    delete_adapter(fresh, "default")
    assert not list_adapters(fresh) and not sites(fresh)


def test_layers_option_and_target_module_overrides():
    model = gpt2()
    inject(model, AdapterConfig(placement="houlsby", layers=[-1]))
    assert sorted(sites(model)) == ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(ValueError, match=r"layers \[5\] are not among the blocks 0..1"):
        inject(gpt2(), AdapterConfig(layers=[5]))
    model = llama()
    inject(model, AdapterConfig(placement="parallel", target_modules=["self_attn"], modules_to_save=None))
    assert sites(model) == {"model.layers.0.self_attn": "parallel", "model.layers.1.self_attn": "parallel"}
    with pytest.raises(TypeError, match="returned tuple"):
        output(model, token_batch())  # attention modules return (output, weights): not a place for an adapter
    model = llama()
    inject(model, AdapterConfig(target_modules=["up_proj"], reduction_factor=4, modules_to_save=None))
    layer = model.model.layers[0].mlp.up_proj
    assert set(sites(model)) == {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"}
    assert layer.adapters["default"].down.weight.shape == (12, 48)  # sized by the wrapped layer's output (48)


def test_config_errors_name_the_valid_choices():
    for kwargs, message in [
        ({"placement": "serial"}, r"unknown placement 'serial'.*houlsby"),
        ({"activation": "tanh"}, r"unknown activation 'tanh'.*gelu"),
        ({"bottleneck_size": 0}, "bottleneck_size must be an integer >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"layers": []}, "layers must be a non-empty list"),
    ]:
        with pytest.raises(ValueError, match=message):
            AdapterConfig(**kwargs)
    with pytest.raises(ValueError, match="no block layout for model type 'timm:ResNet'"):
        inject(__import__("timm").create_model("resnet18", pretrained=False), AdapterConfig())
    assert AdapterConfig.from_dict(AdapterConfig(placement="parallel", layers=[0]).to_dict()) == AdapterConfig(placement="parallel", layers=[0])


def test_half_precision_base_keeps_fp32_adapters_and_stays_exact_at_init():
    model = llama().to(torch.bfloat16)  # nn.Module.to reaches the wrappers too
    x = token_batch()
    with torch.no_grad():
        before = output(model, x)
    inject(model, AdapterConfig(placement="houlsby", modules_to_save=None))
    adapter = model.model.layers[0].mlp.down_proj.adapters["default"]
    assert adapter.up.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(output(model, x), before)
        model.double()
        assert adapter.up.weight.dtype == torch.float64 and output(model, x).dtype == torch.float64
