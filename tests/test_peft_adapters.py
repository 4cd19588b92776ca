"""Targets, trainable sets and counts, several named adapters: switch, disable, delete, mixed batches, merge rules."""

from __future__ import annotations

import pytest
import torch
from tiny_models import bert, gpt2, llama, output, randomize, resnet, token_batch, vit
from torch import nn

from lightning_peft import (
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    active_adapters,
    adapter_batch,
    count_parameters,
    delete_adapter,
    disable_adapters,
    inject,
    list_adapters,
    merge,
    set_adapter,
    unmerge,
)
from lightning_peft.peft import AdapterLayer
from lightning_peft.peft.targeting import all_linear_modules, head_modules


def wrapped(model: nn.Module, method: str | None = None) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and (method is None or m.method == method)]


# --- targeting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,expected", [
    (bert, ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
            "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]),
    (gpt2, ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    (llama, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    (vit, ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]),
])
def test_default_lora_targets_per_architecture(factory, expected):
    model = factory()
    inject(model, LoRAConfig(r=2))
    assert wrapped(model, "lora") == expected


@pytest.mark.parametrize("pattern,expected", [
    ("query", 2),                                          # dotted suffix
    ("bert.encoder.layer.1.attention.self.query", 1),      # exact name
    (r"re:.*layer\.0\.attention\.self\.(query|key)", 2),  # regex over the whole name
    ("self.value", 2),                                     # multi-part suffix
])
def test_target_patterns(pattern, expected):
    model = bert()
    inject(model, LoRAConfig(r=2, target_modules=[pattern]))
    assert len(wrapped(model, "lora")) == expected


def test_all_linear_skips_the_output_head_and_the_task_head():
    model = llama()
    names = all_linear_modules(model)
    assert "lm_head" not in names and len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    names = all_linear_modules(bert())
    assert "classifier" not in names and "bert.pooler.dense" in names and len(names) == 2 * 6 + 1
    assert all_linear_modules(gpt2()) == [n for n, _ in gpt2().named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]


def test_targets_that_match_nothing_list_the_candidates():
    with pytest.raises(ValueError, match=r"'qeury' matched no module .* Modules it can wrap: .*attention\.self\.query"):
        inject(bert(), LoRAConfig(target_modules=["query", "qeury"]))
    with pytest.raises(ValueError, match=r"matched only modules it cannot wrap \(BertEncoder"):
        inject(bert(), LoRAConfig(target_modules=["encoder"]))
    with pytest.raises(ValueError, match="no default target modules for model type 'timm:ResNet'"):
        inject(__import__("timm").create_model("resnet18", pretrained=False), LoRAConfig())
    with pytest.raises(ValueError, match="exclude_modules pattern 'nope' matched no module"):
        inject(bert(), LoRAConfig(exclude_modules=["nope"]))


def test_failed_injection_leaves_the_model_untouched():
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        inject(model, LoRAConfig(target_modules=["query", "nothing_here"]))
    assert not wrapped(model) and list(model.state_dict()) == list(before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_exclude_modules():
    model = llama()
    inject(model, LoRAConfig(target_modules="all-linear", exclude_modules=["re:.*layers\\.0\\..*", "down_proj"]))
    assert wrapped(model, "lora") and all("layers.1." in n and "down_proj" not in n for n in wrapped(model, "lora"))


def test_head_found_automatically_is_saved_in_full():
    assert head_modules(bert()) == ["classifier"]
    assert head_modules(gpt2()) == []  # its LM head is tied to the input embeddings: part of the backbone
    assert head_modules(llama()) == []  # an untied LM head is pretrained output embeddings, not a new head
    assert head_modules(resnet()) == ["fc"] and head_modules(vit()) == ["head"]


# --- what trains ---------------------------------------------------------------------------------

def test_only_the_adapter_and_the_head_copy_train_with_exact_counts():
    model = bert()
    inject(model, LoRAConfig(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".adapters.default." in n}
    lora = 2 * 2 * 4 * (32 + 32)  # 2 layers x (query, value) x r x (in + out)
    head = 32 * 3 + 3
    assert count_parameters(model).trainable == lora + head
    assert not model.classifier.base_layer.weight.requires_grad


def test_bitfit_trains_exactly_the_biases_of_the_backbone():
    model = bert()
    biases = sum(m.bias.numel() for n, m in model.named_modules() if n.startswith("bert.") and isinstance(getattr(m, "bias", None), nn.Parameter))
    inject(model, BitFitConfig())
    assert count_parameters(model).trainable == biases + 32 * 3 + 3


def test_bitfit_on_a_model_without_biases_is_a_clear_error():
    with pytest.raises(ValueError, match="BitFit found no bias parameters"):
        inject(llama(), BitFitConfig())


def test_ia3_default_targets_keys_values_and_ffn_input():
    model = llama()
    inject(model, IA3Config())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer) and m.method == "ia3"}
    assert sorted(n.rsplit(".", 1)[1] for n in layers) == ["down_proj", "down_proj", "k_proj", "k_proj", "v_proj", "v_proj"]
    for n, m in layers.items():
        assert m.adapters["default"].feedforward == n.endswith("down_proj")


# --- several adapters ----------------------------------------------------------------------------

def _two_adapter_bert():
    model = bert()
    x = token_batch(4)
    with torch.no_grad():
        base = output(model, x)
    inject(model, LoRAConfig(r=4), "a")
    randomize(model, seed=1)
    inject(model, LoRAConfig(r=2, target_modules=["query"]), "b")
    randomize(model, seed=2)
    return model, x, base


def test_switch_disable_and_delete():
    model, x, base = _two_adapter_bert()
    assert list_adapters(model) == ["a", "b"] and active_adapters(model) == ["b"]
    with torch.no_grad():
        out_b = output(model, x)
        set_adapter(model, "a")
        out_a = output(model, x)
        assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
        assert {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"a"}
        with disable_adapters(model):
            torch.testing.assert_close(output(model, x), base)
        torch.testing.assert_close(output(model, x), out_a)  # the previous state comes back
        delete_adapter(model, "a")
        assert list_adapters(model) == ["b"] and active_adapters(model) == []
        assert type(model.bert.encoder.layer[0].attention.self.value) is nn.Linear  # only "a" had wrapped it
        torch.testing.assert_close(output(model, x), base)
        set_adapter(model, "b")
        torch.testing.assert_close(output(model, x), out_b)
    with pytest.raises(ValueError, match=r"No adapter named 'zz'.*adapters: 'b'"):
        set_adapter(model, "zz")


def test_mixed_batch_routes_each_sample_through_its_own_adapter():
    model, x, base = _two_adapter_bert()
    with torch.no_grad():
        per_adapter = {}
        for name in ("a", "b"):
            set_adapter(model, name)
            per_adapter[name] = output(model, x)
        per_adapter[None] = base
        route = ["b", None, "a", "b"]
        with adapter_batch(model, route):
            mixed = output(model, x)
    expected = torch.stack([per_adapter[name][i] for i, name in enumerate(route)])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_mixed_batch_gradients_reach_each_adapter_only_from_its_samples():
    model, x, _ = _two_adapter_bert()
    set_adapter(model, ["a", "b"])
    with adapter_batch(model, ["a", "a", None, None]):
        output(model, x).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".adapters.a." in n and "lora_" in n)
    assert all(g is None for n, g in grads.items() if ".adapters.b." in n)


def test_mixed_batch_errors():
    model, x, _ = _two_adapter_bert()
    with pytest.raises(ValueError, match="No adapter named 'c'"):
        with adapter_batch(model, ["a", "c", None, None]):
            pass
    with pytest.raises(ValueError, match="gave 3 adapter names but this layer sees a batch of 4"):
        with adapter_batch(model, ["a", "b", None]):
            output(model, x)
    merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with adapter_batch(model, ["a", "b", None, None]):
            output(model, x)


def test_several_active_lora_adapters_add_up():
    model, x, base = _two_adapter_bert()
    with torch.no_grad():
        set_adapter(model, "a")
        delta_a = output(model, x) - base
        set_adapter(model, "b")
        delta_b = output(model, x) - base
    # Through the whole network outputs do not add linearly; check one layer's output instead.
    layer = model.bert.encoder.layer[0].attention.self.query
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        set_adapter(model, ["a", "b"])
        both = layer(h) - layer.base_layer(h)
        set_adapter(model, "a")
        only_a = layer(h) - layer.base_layer(h)
        set_adapter(model, "b")
        only_b = layer(h) - layer.base_layer(h)
    torch.testing.assert_close(both, only_a + only_b, rtol=1e-5, atol=1e-5)
    assert delta_a.abs().sum() > 0 and delta_b.abs().sum() > 0


def test_adapter_names_are_validated_and_unique():
    model = bert()
    inject(model, LoRAConfig(r=2), "mlp")  # a module name elsewhere is fine: keys are structural
    for bad in ("a.b", "", "1x", "keys", "training"):
        with pytest.raises(ValueError, match="Invalid adapter name"):
            inject(model, LoRAConfig(r=2), bad)
    with pytest.raises(ValueError, match="already exists"):
        inject(model, LoRAConfig(r=2), "mlp")


def test_one_method_per_module():
    model = bert()
    inject(model, LoRAConfig(r=2), "a")
    with pytest.raises(ValueError, match="already carries lora adapters"):
        inject(model, IA3Config(target_modules=["query"]), "b")


def test_merging_a_weight_tied_to_another_module_is_refused():
    model = gpt2()  # wte is tied to lm_head
    inject(model, LoRAConfig(r=2, target_modules=["wte", "c_attn"]))
    randomize(model)
    with pytest.raises(RuntimeError, match="shared with .*lm_head.weight"):
        merge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, AdapterLayer))  # nothing merged halfway


def test_merged_model_has_base_layer_speed_path(monkeypatch):
    from lightning_peft.kernels import dispatch

    model, x, _ = _two_adapter_bert()
    merge(model)
    calls = []
    for m in model.modules():
        if isinstance(m, AdapterLayer) and m.method == "lora":
            for adapter in m.adapters.values():
                adapter.register_forward_hook(lambda *a: calls.append(1))
    real = dispatch.lora_linear_multi  # LoRA on linear layers runs as kernels.lora_linear_multi
    monkeypatch.setattr(dispatch, "lora_linear_multi", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        output(model, x)
    assert calls == []  # no adapter branch runs once merged
    unmerge(model)
    with torch.no_grad():
        output(model, x)
    assert calls


@pytest.mark.parametrize("make", [lambda: IA3Config(init_ones=False), lambda: BitFitConfig()], ids=["ia3", "bitfit"])
def test_mixed_batch_for_scaling_and_bias_methods(make):
    model = bert()
    x = token_batch(4)
    with torch.no_grad():
        base = output(model, x)
    inject(model, make(), "a")
    randomize(model, seed=1)
    inject(model, make(), "b")
    randomize(model, seed=2)
    with torch.no_grad():
        per_adapter = {None: base}
        for name in ("a", "b"):
            set_adapter(model, name)
            per_adapter[name] = output(model, x)
        route = ["a", None, "b", "a"]
        with adapter_batch(model, route):
            mixed = output(model, x)
    assert not torch.allclose(per_adapter["a"], per_adapter["b"])
    expected = torch.stack([per_adapter[name][i] for i, name in enumerate(route)])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
