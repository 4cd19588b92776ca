"""LoRALayer on nn.Linear / GPT-2 Conv1D goes through ``kernels.lora_linear_multi`` (the addmm ordering: rank-r terms
accumulated into the base output, x and x·Aᵀ saved): the same outputs and gradients as the old eager formula
(``LoRA.forward`` per adapter, what HF PEFT computes), and less saved for backward."""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import pytest
import torch
from tiny_models import randomize
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import LoRAConfig, adapter_batch, count_saved_bytes, inject, set_adapter
from lightning_peft.peft.lora import LoRALayer

CASES = ["single", "two_active", "mixed_batch", "conv1d", "bf16_masters", "base_trains"]


def build(case: str, dropout: float = 0.0):
    """(model, x, routing: a context-manager factory) for one case; adapters have random A, B and bias deltas."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case == "bf16_masters" else torch.float32
    layer = Conv1D(37, 41) if case == "conv1d" else nn.Linear(41, 37)
    with torch.no_grad():
        layer.bias.normal_()  # Conv1D's bias starts at zero
    model = nn.Sequential(OrderedDict(fc=layer)).to(dtype)
    config = lambda: LoRAConfig(r=5, alpha=10.0, dropout=dropout, target_modules=["fc"], modules_to_save=None, bias="lora_only")
    inject(model, config(), "a")
    inject(model, config(), "b")
    randomize(model, seed=1)  # the active adapter "b"
    set_adapter(model, "a")
    randomize(model, seed=2)
    routing = contextlib.nullcontext
    if case in ("two_active", "mixed_batch"):
        set_adapter(model, ["a", "b"])
    if case == "mixed_batch":
        routing = lambda: adapter_batch(model, ["b", None, "a", "b"])
    if case == "base_trains":
        model.fc.base_layer.requires_grad_(True)
    x = torch.randn(4, 9, 41, dtype=dtype)
    return model, x, routing


def eager(monkeypatch):
    """The old path: every adapter through ``LoRA.forward`` added to the base output."""
    monkeypatch.setattr(LoRALayer, "_lora_linear", lambda self, x, routes: None)


def step(model, x, routing, seed=1):
    """Output and every gradient (x and the trainable parameters) of one forward/backward."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with routing():
        y = model(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32).to(y.dtype)
    (y.float() * dy.float()).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad} | {"x": x.grad}
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def assert_same(got, want, dtype):
    """Equal within a few units of the compute dtype's rounding, relative to the largest value of each tensor."""
    rel = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the new path rounds operands to bf16, eager widens x to fp32
    (y, g), (y_ref, g_ref) = got, want
    assert set(g) == set(g_ref) and all(v is not None for v in g.values())
    for name, a, b in [("y", y, y_ref), *((n, g[n], g_ref[n]) for n in g)]:
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = (a.double() - b.double()).abs().max().item()
        assert err <= rel * b.double().abs().max().item() + 1e-6, f"{name}: max error {err:.3e}"


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_equal_the_eager_formula(case, monkeypatch):
    model, x, routing = build(case)
    calls = []
    real = LoRALayer._lora_linear
    monkeypatch.setattr(LoRALayer, "_lora_linear", lambda self, *a: calls.append(1) or real(self, *a))
    got = step(model, x, routing)
    assert calls == [1]
    eager(monkeypatch)
    want = step(model, x, routing)
    assert_same(got, want, x.dtype)
    expected = {"x", "fc.adapters.a.lora_A", "fc.adapters.a.lora_B", "fc.adapters.a.bias_delta"}
    if case in ("two_active", "mixed_batch"):
        expected |= {n.replace(".a.", ".b.") for n in expected if ".a." in n}
    if case == "base_trains":
        expected |= {"fc.base_layer.weight", "fc.base_layer.bias"}
    assert set(got[1]) == expected
    if case == "bf16_masters":  # fp32 adapter masters get fp32 gradients
        assert got[0].dtype == torch.bfloat16
        assert all(got[1][n].dtype == torch.float32 for n in expected if n != "x")


@pytest.mark.parametrize("case", ["single", "two_active", "mixed_batch", "conv1d"])
def test_dropout_uses_the_same_masks_as_the_eager_formula(case, monkeypatch):
    model, x, routing = build(case, dropout=0.3)
    got = step(model, x, routing)
    eager(monkeypatch)
    assert_same(got, step(model, x, routing), x.dtype)


def test_dropout_applies_in_training_only():
    model, x, _ = build("two_active", dropout=0.5)
    outs = [step(model, x, contextlib.nullcontext, seed=s)[0] for s in (1, 2)]
    assert not torch.allclose(outs[0], outs[1])  # different masks
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        y1 = model(x)
        torch.manual_seed(2)
        y2 = model(x)
    assert torch.equal(y1, y2)
    model.fc.adapters["a"].dropout.p = model.fc.adapters["b"].dropout.p = 0.0
    with torch.no_grad():
        assert torch.equal(model(x), y1)  # eval: as if there were no dropout


def saved_bytes(model, x, routing) -> int:
    with count_saved_bytes(exclude=list(model.parameters())) as saved, routing():
        model(x * 1.0)  # a non-leaf activation, as inside a network
    return saved.bytes


@pytest.mark.parametrize("case", CASES)
def test_saves_less_for_backward_than_the_eager_formula(case, monkeypatch):
    """x and x·Aᵀ only: the eager formula also keeps the gathered rows of a mixed batch and the fp32 copy of a
    16-bit x it makes for fp32 adapters (activation memory is the point of the change). Parameters left out."""
    model, x, routing = build(case)
    x.requires_grad_()
    new = saved_bytes(model, x, routing)
    eager(monkeypatch)
    old = saved_bytes(model, x, routing)
    assert 0 < new <= old, (new, old)
    if case == "mixed_batch":
        assert new < old, (new, old)
    if case == "bf16_masters":
        assert new < 0.6 * old, (new, old)


def test_multi_adapter_layer_compiles_on_cpu():
    """The PyTorch path of the layer under torch.compile (aot_eager) gives the eager outputs and gradients."""
    model, x, routing = build("two_active")
    want = step(model, x, routing)
    torch._dynamo.reset()
    model.compile(backend="aot_eager")  # in place: the parameter names stay
    assert_same(step(model, x, routing), want, x.dtype)
