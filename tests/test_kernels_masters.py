"""fp32 adapter masters on a bf16 base: the kernels keep activations 16-bit and return fp32 gradients.

The data are small integers, so every product and fp32 sum is exact and every rank-r operand is
exactly representable in bf16: the fp32 gradients must then equal the float64 ones bit for bit,
while those values are not all representable in bf16 (a gradient rounded to bf16 fails). On CPU
the kernels run under TRITON_INTERPRET=1 (conftest.py).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from kernel_checks import DEVICE
from torch import nn

from lightning_peft import AdapterConfig, LoRAConfig, inject
from lightning_peft.kernels import (
    adapter_bottleneck_reference,
    adapter_bottleneck_triton,
    dispatch,
    lora_linear_reference,
    lora_linear_triton,
)
from lightning_peft.kernels.lora_addmm import lora_linear_addmm

BF16 = torch.bfloat16


def ints(g, *shape, lo=-1, hi=1):
    return torch.randint(lo, hi + 1, shape, generator=g).double()


def not_bf16_exact(t: torch.Tensor) -> bool:
    """Some value of ``t`` changes when rounded to bf16 (so a bf16-rounded gradient would differ)."""
    return bool((t.to(BF16).double() != t.double()).any())


def lora_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    # M = 369 rows: dA, dB, dbias sum hundreds of integers (beyond bf16's 256), h and dh stay below 256
    return dict(x=ints(g, 9, 41, 41), weight=ints(g, 37, 41), bias=ints(g, 37), lora_a=ints(g, 3, 41),
                lora_b=ints(g, 37, 3)), ints(g, 9, 41, 37, lo=-1, hi=3)  # dy's mean 1: Σ_rows dy beyond 256


def run(fn, t, dy, dtypes, **kw):
    leaves = {k: v.detach().to(DEVICE, dtypes.get(k, BF16)).requires_grad_(k != "weight") for k, v in t.items()}
    y = fn(*leaves.values(), 2.0, **kw)
    y.backward(dy.to(DEVICE, y.dtype))
    return y.detach(), {k: v.grad for k, v in leaves.items() if v.requires_grad}


MASTERS = {"bias": torch.float32, "lora_a": torch.float32, "lora_b": torch.float32}
EXACT64 = dict.fromkeys(["x", "weight", "bias", "lora_a", "lora_b"], torch.float64)


@pytest.mark.parametrize("fn", [lora_linear_triton, lora_linear_reference, lambda *a: lora_linear_addmm(*a, ops="triton"),
                                lambda *a: lora_linear_addmm(*a, ops="torch")], ids=["fused", "reference", "addmm", "addmm_torch"])
def test_lora_fp32_masters_get_exact_fp32_gradients(fn):
    t, dy = lora_data()
    y64, g64 = run(lora_linear_reference, t, dy, EXACT64)
    y, g = run(fn, t, dy, MASTERS)
    assert y.dtype == BF16 and g["x"].dtype == BF16
    torch.testing.assert_close(y.double(), y64.double(), rtol=2**-8, atol=0)
    torch.testing.assert_close(g["x"].double(), g64["x"].double(), rtol=2**-8, atol=0)
    for name in ("bias", "lora_a", "lora_b"):
        assert g[name].dtype == torch.float32, name
        assert not_bf16_exact(g64[name]), name  # the check below can tell a bf16-rounded gradient
        torch.testing.assert_close(g[name].double(), g64[name].cpu(), rtol=0, atol=0, msg=name)


def holder(**layers: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(layers))


def _set_ints(model: nn.Module, g) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(ints(g, *p.shape))


@pytest.mark.parametrize("path", ["torch", "fused", "addmm"])
def test_lora_layer_on_a_bf16_base_returns_fp32_adapter_gradients(monkeypatch, path):
    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: path != "torch")  # the interpreter stands in for a GPU
    monkeypatch.setenv(dispatch.PATH_ENV_VAR, "auto" if path == "torch" else path)
    model = holder(fc=nn.Linear(41, 37)).to(DEVICE, BF16)
    inject(model, LoRAConfig(r=3, alpha=6.0, target_modules=["fc"], modules_to_save=None, bias="lora_only"))
    adapter = model.fc.adapters["default"]
    assert adapter.lora_A.dtype == adapter.bias_delta.dtype == torch.float32  # fp32 masters
    _set_ints(model, torch.Generator().manual_seed(1))
    t, dy = lora_data(seed=2)
    calls = []
    for name in ("lora_linear_triton", "lora_linear_addmm"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _r=real, _n=name, **k: calls.append((_n, a[3].dtype)) or _r(*a, **k))
    x = t["x"].to(DEVICE, BF16).requires_grad_()
    y = model(x)
    y.backward(dy.to(DEVICE, BF16))
    assert calls == [(f"lora_linear_{'triton' if path == 'fused' else 'addmm'}", torch.float32)]  # the masters went in
    base = model.fc.base_layer
    exact = dict(x=t["x"], weight=base.weight.double(), bias=base.bias.double() + adapter.bias_delta.double(),
                 lora_a=adapter.lora_A.double(), lora_b=adapter.lora_B.double())
    exact = {k: v.cpu() for k, v in exact.items()}
    y64, g64 = run(lora_linear_reference, {k: v.detach() for k, v in exact.items()}, dy, EXACT64)
    torch.testing.assert_close(y.double().cpu(), y64.cpu(), rtol=2**-8, atol=0)
    for name, grad in (("lora_a", adapter.lora_A.grad), ("lora_b", adapter.lora_B.grad), ("bias", adapter.bias_delta.grad)):
        assert grad.dtype == torch.float32 and not_bf16_exact(g64[name]), name
        torch.testing.assert_close(grad.double().cpu(), g64[name].cpu(), rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------- bottleneck


ORDER = ["x", "w_down", "b_down", "w_up", "b_up"]


def adapter_data(seed=0, residual=False):
    g = torch.Generator().manual_seed(seed)
    t = dict(x=ints(g, 9, 41, 41), w_down=ints(g, 13, 41), b_down=ints(g, 13), w_up=ints(g, 41, 13), b_up=ints(g, 41))
    if residual:
        t["residual"] = ints(g, 9, 41, 41)
    return t, ints(g, 9, 41, 41, lo=-1, hi=3)


def run_adapter(fn, t, dy, x_dtype, w_dtype):
    leaves = {k: v.detach().to(DEVICE, x_dtype if k in ("x", "residual") else w_dtype).requires_grad_() for k, v in t.items()}
    y = fn(*[leaves[k] for k in ORDER], activation="relu", scale=1.0, residual=leaves.get("residual"))
    y.backward(dy.to(DEVICE, y.dtype))
    return y.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("residual", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("fn", [adapter_bottleneck_triton, adapter_bottleneck_reference], ids=["triton", "reference"])
def test_bottleneck_fp32_masters_on_bf16_activations(fn, residual):
    t, dy = adapter_data(residual=residual)
    y64, g64 = run_adapter(adapter_bottleneck_reference, t, dy, torch.float64, torch.float64)
    y, g = run_adapter(fn, t, dy, BF16, torch.float32)
    assert y.dtype == g["x"].dtype == BF16  # activations stay 16-bit
    torch.testing.assert_close(y.double(), y64, rtol=2**-8, atol=0)
    torch.testing.assert_close(g["x"].double(), g64["x"], rtol=2**-8, atol=0)
    for name in ORDER[1:]:
        assert g[name].dtype == torch.float32, name
        torch.testing.assert_close(g[name].double(), g64[name], rtol=0, atol=0, msg=name)
    assert not_bf16_exact(g64["w_down"]) and not_bf16_exact(g64["w_up"])


@pytest.mark.parametrize("placement,serial", [("houlsby", True), ("parallel", False)])
def test_bottleneck_layer_keeps_bf16_activations_and_takes_the_residual_is_x_path(monkeypatch, placement, serial):
    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: True)  # the interpreter stands in for a GPU
    calls = []
    real = dispatch.adapter_bottleneck_triton

    def spy(x, w_down, *args):
        residual = args[-1]
        calls.append((x.dtype, w_down.dtype, None if residual is None else residual.dtype))
        return real(x, w_down, *args)

    monkeypatch.setattr(dispatch, "adapter_bottleneck_triton", spy)
    model = holder(fc=nn.Linear(41, 41)).to(DEVICE, BF16)
    inject(model, AdapterConfig(placement=placement, target_modules=["fc"], bottleneck_size=13, activation="relu",
                                scale=2.0, modules_to_save=None))
    adapter = model.fc.adapters["default"]
    _set_ints(adapter, torch.Generator().manual_seed(3))
    t, dy = adapter_data(seed=4)
    t, dy = {k: v.to(DEVICE) for k, v in t.items()}, dy.to(DEVICE)
    x = t["x"].to(BF16).requires_grad_()
    y = model(x)
    y.backward(dy.to(BF16))
    # bf16 activations with fp32 weights, and for the serial adapter residual=None: the kernel's residual-is-x path
    assert calls == [(BF16, torch.float32, None if serial else BF16)]
    # the same in float64 from the adapter's input (the base output for the serial adapter, x for the parallel one)
    base = model.fc.base_layer(x).detach().double()
    params = {"w_down": adapter.down.weight, "b_down": adapter.down.bias, "w_up": adapter.up.weight, "b_up": adapter.up.bias}
    w64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    y64 = adapter_bottleneck_reference(base if serial else t["x"], *w64.values(), activation="relu", scale=2.0,
                                       residual=None if serial else base)
    y64.backward(dy)
    torch.testing.assert_close(y.double(), y64.detach(), rtol=2**-6, atol=2**-8 * y64.abs().max().item())
    for k, p in params.items():
        assert p.grad.dtype == torch.float32, k
        # the parallel adapter reads the integer x: every sum is exact, so are its fp32 gradients
        tol = dict(rtol=2**-6, atol=2**-6 * w64[k].grad.abs().max().item()) if serial else dict(rtol=0, atol=0)
        torch.testing.assert_close(p.grad.double(), w64[k].grad, msg=k, **tol)
