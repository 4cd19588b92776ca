"""LoRA's variants against Hugging Face PEFT on the same tensors: DoRA (outputs, gradients, magnitude init, merge,
PEFT files both ways), PiSSA / OLoRA inits (A, B and the residual base; saved adapters on the original base)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import gpt2, llama, output, randomize, token_batch
from torch import nn

from lightning_peft import LoRAConfig, export_peft, import_peft, inject, load_adapter, merge, save_adapter, unmerge
from lightning_peft.peft.layer import adapter_layers

peft = pytest.importorskip("peft")
X = token_batch()


def peft_twin(base: nn.Module, seed: int = 3, **config) -> nn.Module:
    """A PEFT model of ``base`` with every trainable tensor moved off its init (so B, m are not trivial)."""
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **config))
    randomize(model, std=0.2, seed=seed)
    return model.eval()


def copy_from_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy PEFT's adapter tensors into ours (same module names): A, B and DoRA's magnitude."""
    inner = theirs.base_model.model
    for name, layer in adapter_layers(ours):
        src = inner.get_submodule(name)
        adapter = layer.adapters["default"]
        with torch.no_grad():
            adapter.lora_A.copy_(src.lora_A["default"].weight)
            adapter.lora_B.copy_(src.lora_B["default"].weight)
            if adapter.dora:
                adapter.lora_magnitude_vector.copy_(src.lora_magnitude_vector["default"].weight.view_as(adapter.lora_magnitude_vector))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the adapter tensors, keyed ``<module>.<lora_A|lora_B|lora_magnitude_vector>`` for both libraries."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".adapters.default", "").replace(".default.weight", "").replace(".default", "")
            out[key] = p.grad.view(-1)
    return out


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


CASES = {  # base, inputs, targets: Linear (Llama), GPT-2 Conv1D, Conv2d
    "llama-linear": (llama, lambda: X, ["q_proj", "v_proj", "down_proj"]),
    "gpt2-conv1d": (gpt2, lambda: X, ["c_attn", "c_proj"]),
    "conv2d": (ConvNet, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), ["conv"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_equals_peft_outputs_gradients_and_magnitude_init(case):
    make, inputs, targets = CASES[case]
    x = inputs()
    ours = inject(make(), LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=targets, modules_to_save=None)).eval()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets)).eval()
    for name, layer in adapter_layers(ours):  # m = ||W|| per output unit at init, as PEFT's
        mine = layer.adapters["default"].lora_magnitude_vector
        theirs_m = theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(mine.view(-1), theirs_m.view(-1), rtol=1e-6, atol=1e-6)
    randomize(theirs, std=0.2, seed=3)
    copy_from_peft(ours, theirs)
    out_ours, out_theirs = output(ours, x), output(theirs, x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_ours, output(make(), x), atol=1e-3)  # the adapter does change the model
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    mine, peft_grads = grads(ours), grads(theirs)
    assert sorted(mine) == sorted(peft_grads) and any(k.endswith("lora_magnitude_vector") for k in mine)
    for key in mine:
        torch.testing.assert_close(mine[key], peft_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_dora_with_dropout_in_training_equals_peft_on_the_same_random_stream():
    theirs = peft_twin(llama(), use_dora=True, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]).train()
    ours = inject(llama(), LoRAConfig(r=4, alpha=8, dropout=0.3, use_dora=True, target_modules=["q_proj", "v_proj"])).train()
    copy_from_peft(ours, theirs)
    torch.manual_seed(5)
    expected = output(theirs, X)
    torch.manual_seed(5)
    torch.testing.assert_close(output(ours, X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["llama-linear", "gpt2-conv1d", "conv2d"])
def test_dora_merge_unmerge_round_trip(case):
    make, inputs, targets = CASES[case]
    x = inputs()
    model = inject(make(), LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=targets, modules_to_save=None)).eval()
    randomize(model, std=0.2)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in adapter_layers(model)}
    with torch.no_grad():
        expected = output(model, x)
        merge(model)
        torch.testing.assert_close(output(model, x), expected, rtol=1e-5, atol=1e-5)
        assert any(not torch.equal(layer.base_layer.weight, weights[n]) for n, layer in adapter_layers(model))
        unmerge(model)
        torch.testing.assert_close(output(model, x), expected, rtol=1e-5, atol=1e-5)
    for n, layer in adapter_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, weights[n], rtol=1e-5, atol=1e-6)


def test_dora_merges_only_alone_and_refuses_embeddings():
    model = inject(llama(), LoRAConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="plain")
    from lightning_peft import set_adapter

    set_adapter(model, ["default", "plain"])
    with pytest.raises(RuntimeError, match=r"DoRA adapters \(\['default'\]\) rescale the whole weight"):
        merge(model)
    with pytest.raises(ValueError, match=r"'model.embed_tokens' is an embedding; DoRA here wraps Linear, Conv1D and Conv2d"):
        inject(llama(), LoRAConfig(use_dora=True, target_modules=["embed_tokens"]))


@pytest.mark.parametrize("make,targets", [(llama, ["q_proj", "v_proj"]), (gpt2, ["c_attn"])], ids=["llama", "gpt2"])
def test_dora_peft_files_both_ways(tmp_path, make, targets):
    """PEFT's DoRA adapter -> import_peft equals PEFT; ours -> export_peft -> PeftModel.from_pretrained equals ours."""
    theirs = peft_twin(make(), use_dora=True, target_modules=targets)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = make()
    import_peft(ours, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(output(ours, X), output(theirs, X), rtol=1e-5, atol=1e-5)

    mine = inject(make(), LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=targets))
    randomize(mine, std=0.2, seed=7)
    export_peft(mine, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert config["use_dora"] is True and sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(list(adapter_layers(mine)))
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, X), output(mine.eval(), X), rtol=1e-5, atol=1e-5)
    save_adapter(mine, tmp_path / "native")  # and our own format keeps the magnitude
    again = make()
    load_adapter(again, tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(output(again.eval(), X), output(mine, X), rtol=0, atol=0)


# --- PiSSA / OLoRA: the adapter takes the principal part of W, the base keeps the residual ----------------------------

TARGETS = ["q_proj", "v_proj"]


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight", "q_proj.base_layer.weight", "v_proj.base_layer.weight"))}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_init_equals_peft_a_b_and_residual(init):
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    ours = inject(llama(), LoRAConfig(r=4, alpha=8, target_modules=TARGETS, init_lora_weights=init))
    with torch.no_grad():
        torch.testing.assert_close(output(ours, X), output(llama(), X), rtol=1e-4, atol=1e-5)  # unchanged at init
    inner = theirs.base_model.model
    for name, layer in adapter_layers(ours):
        src, adapter = inner.get_submodule(name), layer.adapters["default"]
        torch.testing.assert_close(adapter.lora_A, src.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.lora_B, src.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.base_layer.weight, src.base_layer.weight, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(layer.base_layer.weight, llama().get_submodule(name).weight, atol=1e-3)  # the base did change


def test_pissa_niter_keeps_the_model_unchanged_at_init_and_is_refused_on_other_layers():
    torch.manual_seed(0)
    ours = inject(llama(), LoRAConfig(r=4, alpha=8, target_modules=TARGETS, init="pissa_niter_4", use_dora=True))
    with torch.no_grad():
        torch.testing.assert_close(output(ours, X), output(llama(), X), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"PiSSA / OLoRA initialise Linear and Conv1D layers"):
        inject(llama(), LoRAConfig(init="olora", target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"choose one of \['kaiming', 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora'\]"):
        LoRAConfig(init="pissa_niter_0")
    with pytest.raises(ValueError, match="disagree"):
        LoRAConfig(init="olora", init_lora_weights="pissa")


@pytest.mark.parametrize("init,dora", [("pissa", False), ("olora", True), ("pissa_niter_2", False)])
def test_saved_adapter_on_the_original_base_reproduces_the_trained_model(tmp_path, init, dora):
    """Adapter files hold the plain rank-2r LoRA of the *original* base (ours and PEFT's layout); deleting restores W."""
    model = inject(llama(), LoRAConfig(r=4, alpha=8, target_modules=TARGETS, init=init, use_dora=dora))
    randomize(model, std=0.05, seed=5)  # "training" moves A, B (and m) away from their init
    with torch.no_grad():
        expected = output(model, X)
    save_adapter(model, tmp_path / "native")
    export_peft(model, tmp_path / "peft")
    meta = json.loads((tmp_path / "native" / "adapter.json").read_text())
    assert meta["config"]["init"] == init and {s["spec"].get("converted_from") for s in meta["sites"]} == {init}
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] is True
    fresh = llama()
    load_adapter(fresh, tmp_path / "native")
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, X), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(output(theirs, X), expected, rtol=1e-4, atol=1e-5)
    from lightning_peft import delete_adapter

    delete_adapter(model, "default")
    for name, weight in base_weights(llama()).items():
        torch.testing.assert_close(model.get_parameter(name), weight, rtol=1e-5, atol=1e-6)


def test_unconverted_export_says_init_lora_weights_and_peft_recomputes_the_residual(tmp_path):
    model = inject(llama(), LoRAConfig(r=4, alpha=8, target_modules=TARGETS, init="olora"))
    randomize(model, std=0.05, seed=5)
    export_peft(model, tmp_path, convert_init=False)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "olora"
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(theirs, X), output(model, X), rtol=1e-4, atol=1e-5)


def test_import_of_an_unconverted_peft_pissa_adapter_recomputes_the_residual(tmp_path):
    theirs = peft_twin(llama(), target_modules=TARGETS, init_lora_weights="pissa")
    theirs.save_pretrained(tmp_path / "pissa")
    ours = llama()
    import_peft(ours, tmp_path / "pissa")
    with torch.no_grad():
        torch.testing.assert_close(output(ours, X), output(theirs, X), rtol=1e-4, atol=1e-5)
    peft_twin(llama(), target_modules=TARGETS, init_lora_weights="pissa_niter_2").save_pretrained(tmp_path / "niter")
    with pytest.raises(ValueError, match=r"pissa_niter_<n> is randomized.*path_initial_model_for_weight_conversion"):
        import_peft(llama(), tmp_path / "niter")


def test_loftq_lowers_the_quantization_error_at_init_and_reloads_exactly(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning_peft import QLoRAConfig
    from lightning_peft.peft.quantization import dequantized_weight, is_quantized

    config = dict(r=4, alpha=8, target_modules=TARGETS, quantize_modules=TARGETS, block_size=32)
    plain = inject(llama(), QLoRAConfig(**config))
    loftq = inject(llama(), QLoRAConfig(**config, init_lora_weights="loftq", loftq_iter=2))
    float_model = llama()
    for name, layer in adapter_layers(loftq):
        w = float_model.get_submodule(name).weight
        adapter = layer.adapters["default"]
        assert is_quantized(layer.base_layer) and is_quantized(plain.get_submodule(name).base_layer)
        plain_error = (w - dequantized_weight(plain.get_submodule(name).base_layer)).norm()
        loftq_error = (w - dequantized_weight(layer.base_layer) - adapter.delta_weight()).norm()
        assert loftq_error < 0.9 * plain_error, (name, float(loftq_error), float(plain_error))
    with torch.no_grad():
        reference = output(float_model, X)
        assert (output(loftq, X) - reference).norm() < (output(plain, X) - reference).norm()
    randomize(loftq, std=0.05)
    with torch.no_grad():
        expected = output(loftq, X)
    save_adapter(loftq, tmp_path / "loftq")
    again = llama()
    load_adapter(again, tmp_path / "loftq")
    with torch.no_grad():
        torch.testing.assert_close(output(again, X), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="LoftQ"):
        export_peft(loftq, tmp_path / "peft")
    with pytest.raises(ValueError, match=r"choose one of \[.*'olora'\]"):
        LoRAConfig(init="loftq")  # LoftQ needs a quantized base: QLoRAConfig
    from lightning_peft import PEFT

    with pytest.raises(ValueError, match=r"export_peft=True\) cannot export a LoftQ adapter"):
        PEFT(QLoRAConfig(init="loftq"), export_peft=True)
