"""Fused bottleneck adapter: the Triton kernels against the PyTorch reference, and the dispatch.

On CPU the real kernels run under TRITON_INTERPRET=1 (set in conftest.py); on CUDA natively.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import CUDA, DEVICE, NEEDS_NEW_INTERPRETER, assert_like_reference, leaves, run_and_grads

from lightning_peft.kernels import (
    ACTIVATIONS,
    adapter_bottleneck,
    adapter_bottleneck_reference,
    adapter_bottleneck_triton,
    dispatch,
    set_kernels_enabled,
    use_kernels,
)

ORDER = ["x", "w_down", "b_down", "w_up", "b_up"]
ALL = {"x", "w_down", "b_down", "w_up", "b_up"}


def masters(lead, d, m, bias=True, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = {
        "x": f(*lead, d),
        "w_down": f(m, d) / math.sqrt(d),
        "b_down": f(m) * 0.5 if bias else None,
        "w_up": f(d, m) / math.sqrt(m),
        "b_up": f(d) * 0.5 if bias else None,
    }
    if residual:
        t["residual"] = f(*lead, d)
    return t, f(*lead, d)


def compare(t, dy, dtype, activation="gelu", scale=0.7, trainable=None, factor=4.0):
    req = set(trainable if trainable is not None else {k for k, v in t.items() if v is not None})
    kw = dict(activation=activation, scale=scale)

    def call(fn, args):
        res = args.get("residual")
        return run_and_grads(lambda *a, **k: fn(*a, residual=res, **k), args, dy, ORDER, **kw)

    y64, g64 = call(adapter_bottleneck_reference, leaves(t, torch.float64, req))
    ylp, glp = call(adapter_bottleneck_reference, leaves(t, dtype, req))
    yk, gk = call(adapter_bottleneck_triton, leaves(t, dtype, req))
    assert_like_reference("y", yk, ylp, y64, factor)
    assert set(gk) == set(g64) == req
    for name in sorted(req):
        assert gk[name].dtype == dtype
        assert_like_reference(f"d{name}", gk[name], glp[name], g64[name], factor)


# (leading dims, d, m): 3-D and 2-D, odd sizes, several row/column blocks, m from 13 to 256
CASES = [((9, 41), 41, 13), ((37,), 150, 13), ((5, 31), 70, 64), ((7,), 33, 256)]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fp32_every_activation(activation):
    t, dy = masters((9, 41), 41, 13, seed=1)
    compare(t, dy, torch.float32, activation)


@pytest.mark.parametrize("lead,d,m", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_shapes_with_and_without_bias(lead, d, m, bias):
    t, dy = masters(lead, d, m, bias, seed=2)
    compare(t, dy, torch.float32)


def test_fp32_separate_residual_gets_dy():
    # the parallel-adapter placement: y = residual + s·adapter(x)
    t, dy = masters((9, 41), 41, 13, residual=True, seed=3)
    compare(t, dy, torch.float32, "silu", scale=2.0)
    compare(t, dy, torch.float32, "relu", trainable={"residual", "w_up"})
    compare(t, dy, torch.float32, "relu", trainable={"residual"})


def test_fp32_residual_with_a_half_precision_branch_promotes_like_eager():
    t, dy = masters((9, 41), 41, 13, residual=True, seed=9)
    args = leaves(t, torch.float16, ALL)
    args_r = leaves(t, torch.float16, ALL)
    res_k = t["residual"].to(DEVICE, torch.float32).requires_grad_()
    res_r = t["residual"].to(DEVICE, torch.float32).requires_grad_()
    yk = adapter_bottleneck_triton(*[args[k] for k in ORDER], residual=res_k)
    yr = adapter_bottleneck_reference(*[args_r[k] for k in ORDER], residual=res_r)
    assert yk.dtype == yr.dtype == torch.float32
    yk.backward(dy.to(DEVICE, torch.float32))
    yr.backward(dy.to(DEVICE, torch.float32))
    torch.testing.assert_close(yk, yr, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(res_k.grad, res_r.grad)
    for name in ALL:
        assert args[name].grad.dtype == torch.float16
        torch.testing.assert_close(args[name].grad, args_r[name].grad, rtol=1e-2, atol=2e-2)


def test_frozen_input_and_partly_trainable_adapter():
    t, dy = masters((9, 41), 41, 13, seed=4)
    compare(t, dy, torch.float32, trainable={"w_up", "b_up"})
    compare(t, dy, torch.float32, "gelu_tanh", trainable={"x"})
    compare(t, dy, torch.float32, trainable={"w_down"})


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("lead,d,m", [CASES[0], CASES[2]])
def test_fp16(lead, d, m, activation):
    t, dy = masters(lead, d, m, seed=5)
    compare(t, dy, torch.float16, activation)


@pytest.mark.parametrize("lead,d,m", [CASES[0], CASES[2]])
def test_bf16(lead, d, m):
    t, dy = masters(lead, d, m, residual=True, seed=6)
    compare(t, dy, torch.bfloat16, "gelu_tanh")


@pytest.mark.skipif(CUDA, reason="float64 Triton dots are an interpreter-only path (dispatch uses the reference)")
@NEEDS_NEW_INTERPRETER
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gradcheck_float64(activation):
    t, _ = masters((2, 3), 5, 3, residual=True, seed=7)
    if activation == "relu":  # keep pre-activations away from the kink at 0
        t["b_down"] = torch.tensor([2.0, -2.5, 3.0], dtype=torch.float64)
        t["w_down"] = t["w_down"] * 0.1
    args = leaves(t, torch.float64, set(t))

    def f(x, wd, bd, wu, bu, res):
        return adapter_bottleneck_triton(x, wd, bd, wu, bu, activation, 0.8, res)

    inputs = tuple(args[k] for k in [*ORDER, "residual"])
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: f(*a[:5], None), inputs[:5], fast_mode=True)


def test_autocast_bf16():
    t, dy = masters((9, 41), 41, 13, seed=8)
    a_k, a_r = leaves(t, torch.float32, ALL), leaves(t, torch.float32, ALL)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        yk = adapter_bottleneck_triton(*[a_k[k] for k in ORDER])
        yr = adapter_bottleneck_reference(*[a_r[k] for k in ORDER])
    # as eager: projections in bf16, the fp32 residual add promotes y to fp32
    assert yk.dtype == yr.dtype == torch.float32
    yk.backward(dy.to(DEVICE, yk.dtype))
    yr.backward(dy.to(DEVICE, yr.dtype))
    torch.testing.assert_close(yk.float(), yr.float(), rtol=2e-2, atol=5e-2)
    for name in ALL:
        assert a_k[name].grad.dtype == torch.float32
        ref = a_r[name].grad
        torch.testing.assert_close(a_k[name].grad, ref, rtol=2e-2, atol=3e-2 * ref.abs().max().item())


# ---------------------------------------------------------------------------------- bad inputs


def _args(d=8, m=4):
    return torch.randn(3, d), torch.randn(m, d), torch.randn(m), torch.randn(d, m), torch.randn(d)


@pytest.mark.parametrize("fn", [adapter_bottleneck, adapter_bottleneck_reference, adapter_bottleneck_triton])
def test_errors_name_the_problem(fn):
    x, wd, bd, wu, bu = (t.to(DEVICE) for t in _args())
    with pytest.raises(ValueError, match=r"unknown activation 'swish'; valid activations are \['gelu', 'gelu_tanh', 'relu', 'silu'\]"):
        fn(x, wd, bd, wu, bu, "swish")
    with pytest.raises(ValueError, match="w_up must have shape"):
        fn(x, wd, bd, wu.t(), bu)
    with pytest.raises(ValueError, match="x must have shape"):
        fn(x[:, :5], wd, bd, wu, bu)
    with pytest.raises(ValueError, match="b_down must have shape"):
        fn(x, wd, bu, wu, bu)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        fn(x, wd, bd, wu, bu, residual=x[:2])


def test_triton_bottleneck_limit_and_dtype_errors():
    x, wd, bd, wu, bu = (t.to(DEVICE) for t in _args(m=300))
    with pytest.raises(ValueError, match=r"bottleneck size m=300 .* maximum 256"):
        adapter_bottleneck_triton(x, wd, bd, wu, bu)
    x, wd, bd, wu, bu = (t.to(DEVICE) for t in _args())
    with pytest.raises(TypeError, match="dtype mismatch: x is torch.float32 but w_up is torch.float16"):
        adapter_bottleneck_triton(x, wd, bd, wu.half(), bu)


def test_dispatch_reference_on_cpu_and_for_large_bottlenecks(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "adapter_bottleneck_triton", lambda *a, **k: calls.append(1))
    previous = set_kernels_enabled(True)
    try:
        for m in (4, 300):
            x, wd, bd, wu, bu = _args(m=m)
            torch.testing.assert_close(adapter_bottleneck(x, wd, bd, wu, bu, "relu", 0.5),
                                       adapter_bottleneck_reference(x, wd, bd, wu, bu, "relu", 0.5))
    finally:
        set_kernels_enabled(previous)
    assert calls == []


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_dispatch_uses_triton_on_cuda_unless_turned_off(monkeypatch):
    calls = []
    real = dispatch.adapter_bottleneck_triton
    monkeypatch.setattr(dispatch, "adapter_bottleneck_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x, wd, bd, wu, bu = (t.cuda() for t in _args())
    adapter_bottleneck(x, wd, bd, wu, bu)
    with use_kernels(False):
        adapter_bottleneck(x, wd, bd, wu, bu)
    assert calls == [1]


# ---------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M,d", [(8192, 4096), (16384, 2048)])
def test_benchmark_shapes_bf16_on_gpu(monkeypatch, M, d):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator(device="cuda").manual_seed(0)
    f = lambda *s: torch.randn(*s, device="cuda", generator=g)
    t = {"x": f(M, d), "w_down": f(64, d) / d**0.5, "b_down": f(64) * 0.1, "w_up": f(d, 64) / 8, "b_up": f(d) * 0.1}
    dy = f(M, d)

    def call(fn, dtype):
        return run_and_grads(fn, leaves(t, dtype, ALL, "cuda"), dy, ORDER)

    y32, g32 = call(adapter_bottleneck_reference, torch.float32)
    ylp, glp = call(adapter_bottleneck_reference, torch.bfloat16)
    yk, gk = call(adapter_bottleneck_triton, torch.bfloat16)
    assert_like_reference("y", yk, ylp, y32)
    for name in ALL:
        assert_like_reference(f"d{name}", gk[name], glp[name], g32[name])
