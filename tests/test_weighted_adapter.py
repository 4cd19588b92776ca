"""add_weighted_adapter against Hugging Face PEFT's: the same trained adapters give the same combined tensors and outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import MODELS, gpt2, llama, output

from lightning_peft import (
    LoRAConfig,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    export_peft,
    import_peft,
    inject,
    list_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from lightning_peft.peft import adapter_layers

peft = pytest.importorskip("peft")
X = MODELS["llama"][1]()
ARCHS = {  # adapter name -> (r, alpha, targets); "t3" has another rank
    "llama": (llama, {"t1": (4, 8, ["q_proj", "v_proj", "embed_tokens"]), "t2": (4, 16, ["q_proj", "k_proj"]), "t3": (2, 4, ["q_proj", "v_proj"])}),
    "gpt2": (gpt2, {"t1": (4, 8, ["c_attn", "c_proj"]), "t2": (4, 16, ["c_attn"]), "t3": (2, 4, ["c_attn"])}),
}


def pair(arch: str, tmp_path):
    """A PEFT model with trained adapters t1, t2, t3, and our model with the same adapters imported from PEFT's files."""
    factory, adapters = ARCHS[arch]
    peft_model = None
    for name, (r, alpha, targets) in adapters.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)
        if peft_model is None:
            peft_model = peft.get_peft_model(factory(), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if ".lora_" in key:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.eval()
    ours = factory()
    for name in adapters:
        peft_model.save_pretrained(tmp_path / "peft", selected_adapters=[name], save_embedding_layers=False)
        import_peft(ours, tmp_path / "peft" / name if name != "default" else tmp_path / "peft", name)
    return peft_model, ours


def peft_combine(peft_model, monkeypatch, *args, **kwargs) -> None:
    """PEFT's add_weighted_adapter with the RNG stream left to the combination (its adapter init draws random numbers; ours draws none)."""
    inject_adapter = peft_model.base_model.inject_adapter

    def quiet_inject(*a, **k):
        with torch.random.fork_rng(devices=[]):
            return inject_adapter(*a, **k)

    monkeypatch.setattr(peft_model.base_model, "inject_adapter", quiet_inject)
    peft_model.add_weighted_adapter(*args, **kwargs)


def peft_factors(peft_model, module: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = peft_model.base_model.model.get_submodule(module)
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def assert_same_adapter(peft_model, ours, name: str) -> None:
    modules = [m for m, layer in adapter_layers(ours) if name in layer.adapters]
    assert modules
    for module in modules:
        a, b = peft_factors(peft_model, module, name)
        mine = ours.get_submodule(module).adapters[name]
        assert mine.scale == 1.0
        torch.testing.assert_close(mine.lora_A, a, rtol=1e-5, atol=1e-6, msg=f"{module} A")
        torch.testing.assert_close(mine.lora_B, b, rtol=1e-5, atol=1e-6, msg=f"{module} B")
    peft_model.set_adapter(name)
    set_adapter(ours, name)
    with torch.no_grad():
        torch.testing.assert_close(output(ours, X), output(peft_model, X), rtol=1e-4, atol=1e-5)


CASES = [
    ("linear", ["t1", "t2"], [0.7, -0.4], {}),
    ("cat", ["t1", "t3"], [0.7, 1.3], {}),
    ("svd", ["t1", "t2", "t3"], [0.7, -0.4, 1.1], {"svd_rank": 3}),
    ("ties", ["t1", "t2"], [0.7, 0.5], {"density": 0.5, "majority_sign_method": "frequency"}),
    ("dare_linear", ["t1", "t2"], [0.7, 0.5], {"density": 0.6}),
    ("dare_ties", ["t1", "t2"], [0.7, -0.5], {"density": 0.6}),
    ("magnitude_prune", ["t1", "t2"], [1.0, 0.5], {"density": 0.3}),
    ("dare_ties_svd", ["t1", "t3"], [0.7, 0.5], {"density": 0.6, "svd_clamp": 0.9}),
]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_combined_adapter_equals_peft(arch, tmp_path, monkeypatch):
    """Every combination type gives PEFT's tensors and outputs (DARE's masks: the same seed, the same draws)."""
    peft_model, ours = pair(arch, tmp_path)
    for i, (combination, adapters, weights, options) in enumerate(CASES):
        name = f"mix{i}"
        torch.manual_seed(i)
        peft_combine(peft_model, monkeypatch, adapters, weights, name, combination_type=combination, **options)
        torch.manual_seed(i)
        assert add_weighted_adapter(ours, adapters, weights, name, combination_type=combination, **options) == name
        assert_same_adapter(peft_model, ours, name)


def test_result_is_an_ordinary_adapter(tmp_path):
    """Not activated and frozen; saves, loads and exports (PEFT reads the export and gives the same outputs)."""
    _, ours = pair("llama", tmp_path)
    set_adapter(ours, "t1")
    add_weighted_adapter(ours, ["t1", "t3"], [1.0, 0.5], "mix", combination_type="cat")
    assert sorted(list_adapters(ours)) == ["mix", "t1", "t2", "t3"]
    assert not any(p.requires_grad for m, layer in adapter_layers(ours) if "mix" in layer.adapters for p in layer.adapters["mix"].parameters())
    set_adapter(ours, "mix")
    with torch.no_grad():
        expected = output(ours, X)
    save_adapter(ours, tmp_path / "ours", "mix")
    export_peft(ours, tmp_path / "export", "mix")
    fresh = llama()
    load_adapter(fresh, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(llama(), tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, X), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(output(reloaded, X), expected, rtol=1e-5, atol=1e-6)


def test_negative_weight_negates_the_task():
    """Task arithmetic: weight -1 on one adapter gives the update -s·B·A on every layer; the combined adapter has scale 1."""
    model = inject(llama(), LoRAConfig(r=4, alpha=12, target_modules=["q_proj", "v_proj"]), "task")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    add_weighted_adapter(model, ["task"], [-1.0], "negated", combination_type="svd")
    for _, layer in adapter_layers(model):
        torch.testing.assert_close(layer.adapters["negated"].delta_weight(), -layer.adapters["task"].delta_weight(), rtol=1e-5, atol=1e-5)
    set_adapter(model, ["task", "negated"])  # the two cancel: the base model's outputs
    with torch.no_grad(), disable_adapters(model):
        base = output(model, X)
    with torch.no_grad():
        torch.testing.assert_close(output(model, X), base, rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_clear_errors(tmp_path):
    _, ours = pair("llama", tmp_path)
    with pytest.raises(ValueError, match=r"unknown combination_type='mean'; choose one of \['svd', 'linear', 'cat'"):
        add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "m", combination_type="mean")
    with pytest.raises(ValueError, match=r"'linear' needs adapters of one rank, got ranks \{'t1': 4, 't3': 2\}; use 'cat' or 'svd'"):
        add_weighted_adapter(ours, ["t1", "t3"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ValueError, match=r"'ties' needs density in \[0, 1\]"):
        add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "m", combination_type="ties")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        add_weighted_adapter(ours, ["t1", "t2"], [1], "m", combination_type="cat")
    with pytest.raises(ValueError, match="No adapter named 'z'"):
        add_weighted_adapter(ours, ["t1", "z"], [1, 1], "m", combination_type="cat")
    with pytest.raises(ValueError, match="Adapter 't2' already exists"):
        add_weighted_adapter(ours, ["t1", "t3"], [1, 1], "t2", combination_type="cat")
    with pytest.raises(ValueError, match="majority_sign_method='most'; choose one of"):
        add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "m", combination_type="ties", density=0.5, majority_sign_method="most")
    assert list_adapters(ours) == ["t1", "t2", "t3"]
    biased = inject(gpt2(), LoRAConfig(r=4, target_modules=["c_attn"], bias="lora_only"), "x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject(biased, LoRAConfig(r=4, target_modules=["c_attn"]), "y")
    with pytest.raises(ValueError, match=r"adapter 'x' trains the bias of 'transformer.h.0.attn.c_attn'"):
        add_weighted_adapter(biased, ["x", "y"], [1, 1], "m", combination_type="cat")
    delete_adapter(biased, "x")
    for variant, message in (({"use_dora": True}, "is a DoRA adapter"), ({"init": "olora"}, r"init='olora', which moved part of the base")):
        model = inject(llama(), LoRAConfig(r=2, target_modules=["q_proj"], **variant), "v")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject(model, LoRAConfig(r=2, target_modules=["q_proj"]), "plain")
        with pytest.raises(ValueError, match=message):
            add_weighted_adapter(model, ["v", "plain"], [1, 1], "m", combination_type="cat")


def test_token_rows_of_one_adapter_are_copied_and_two_are_refused():
    model = inject(llama(), LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5]), "tokens")
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"]), "plain")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    add_weighted_adapter(model, ["tokens", "plain"], [1.0, 1.0], "mix", combination_type="cat")
    embed = model.model.embed_tokens
    assert torch.equal(embed.adapters["mix"].rows, embed.adapters["tokens"].rows)
    assert embed.adapters["mix"].rows.data_ptr() != embed.adapters["tokens"].rows.data_ptr()
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[7]), "more")
    with pytest.raises(ValueError, match=r"adapters \['tokens', 'more'\] each train token rows of 'model.embed_tokens'"):
        add_weighted_adapter(model, ["tokens", "more"], [1.0, 1.0], "mix2", combination_type="cat")
