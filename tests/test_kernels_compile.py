"""The Triton kernels are torch.library custom ops: torch.compile keeps them in its forward and backward graphs
(fullgraph, no fallback to the reference) with the eager kernels' outputs and gradients; ``opcheck`` passes.

Runs the real kernels on CPU under TRITON_INTERPRET=1 (conftest.py), small odd shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import DEVICE, leaves, run_and_grads

pytest.importorskip("triton")

from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from lightning_peft.kernels import (
    adapter_bottleneck_reference,
    adapter_bottleneck_triton,
    dispatch,
    lora_linear,
    lora_linear_addmm,
    lora_linear_reference,
    lora_linear_triton,
)
from lightning_peft.kernels import bottleneck as bn
from lightning_peft.kernels import lora as lk

LORA = ["x", "weight", "bias", "lora_a", "lora_b"]
BOTTLENECK = ["x", "w_down", "b_down", "w_up", "b_up"]


def spying_backend():
    """An aot_eager-like backend recording the ``lightning_peft`` ops of the forward and backward graphs."""
    seen = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            seen[kind] += [str(n.target) for n in gm.graph.nodes
                           if n.op == "call_function" and str(n.target).startswith("lightning_peft.")]
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")), seen


def lora_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    K, N, r = 41, 37, 5
    return {"x": f(3, 7, K), "weight": f(N, K) / math.sqrt(K), "bias": f(N), "lora_a": f(r, K) / math.sqrt(K),
            "lora_b": f(N, r) / math.sqrt(r)}, f(3, 7, N)


def bottleneck_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    d, m = 40, 6
    return {"x": f(3, 7, d), "w_down": f(m, d) / math.sqrt(d), "b_down": f(m), "w_up": f(d, m) / math.sqrt(m),
            "b_up": f(d)}, f(3, 7, d)


def compiled_vs_eager(fn, reference, tensors, dy, order, trainable, **kw):
    """Compile ``fn`` (fullgraph), run forward and backward; compare with the eager call and the reference.
    Returns the ops seen in the compiled graphs."""
    backend, seen = spying_backend()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: fn(*a, **kw), backend=backend, fullgraph=True)
    req = set(trainable)
    y_c, g_c = run_and_grads(compiled, leaves(tensors, torch.float32, req), dy, order)
    y_e, g_e = run_and_grads(fn, leaves(tensors, torch.float32, req), dy, order, **kw)
    y_r, g_r = run_and_grads(reference, leaves(tensors, torch.float32, req), dy, order, **kw)
    torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_c, y_r, rtol=1e-4, atol=1e-4)
    assert set(g_c) == set(g_e) == req
    for name in req:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(g_c[name], g_r[name], rtol=1e-4, atol=1e-4, msg=name)
    return seen


def test_fused_lora_ops_stay_in_the_compiled_graphs():
    m, dy = lora_tensors()
    seen = compiled_vs_eager(lora_linear_triton, lora_linear_reference, m, dy, LORA, LORA, scale=1.75)
    assert seen == {"forward": ["lightning_peft.lora_fused_fwd.default"], "backward": ["lightning_peft.lora_fused_bwd.default"]}


def test_addmm_path_skinny_ops_stay_in_the_compiled_graphs():
    m, dy = lora_tensors(seed=1)
    addmm = lambda *a, **k: lora_linear_addmm(*a, ops="triton", **k)
    seen = compiled_vs_eager(addmm, lora_linear_reference, m, dy, LORA, ["x", "lora_a", "lora_b"], scale=1.75)
    assert seen["forward"] == ["lightning_peft.lora_skinny.default"]
    assert sorted(seen["backward"]) == ["lightning_peft.lora_dy_pass.default", "lightning_peft.lora_skinny.default"]


def test_bottleneck_ops_stay_in_the_compiled_graphs():
    m, dy = bottleneck_tensors()
    seen = compiled_vs_eager(adapter_bottleneck_triton, adapter_bottleneck_reference, m, dy, BOTTLENECK, BOTTLENECK,
                             activation="gelu", scale=0.5)
    assert seen == {"forward": ["lightning_peft.bottleneck_fwd.default"], "backward": ["lightning_peft.bottleneck_bwd.default"]}


def test_dispatch_keeps_the_kernels_under_compile(monkeypatch):
    """Where the kernels apply (the interpreter stands in for a GPU), compiling no longer drops to PyTorch."""
    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: True)
    monkeypatch.setenv(dispatch.PATH_ENV_VAR, "fused")
    m, dy = lora_tensors(seed=2)
    seen = compiled_vs_eager(lora_linear, lora_linear_reference, m, dy, LORA, ["x", "lora_a", "lora_b"], scale=0.5)
    assert seen["forward"] == ["lightning_peft.lora_fused_fwd.default"]


def _small(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def test_opcheck_lora_ops():
    x, w, b, a, bb = _small(5, 9, grad=True), _small(7, 9), _small(7, grad=True), _small(3, 9, grad=True), _small(7, 3, grad=True)
    torch.library.opcheck(lk.lora_fused_fwd, (x, None, w, b, a, bb, 1.5))
    h = _small(5, 3)
    torch.library.opcheck(lk.lora_fused_bwd, (_small(5, 7), x.detach(), None, w, a.detach(), bb.detach(), h, 1.5,
                                               torch.float32, [True, False, True, True, True, True]))
    torch.library.opcheck(lk.lora_skinny, (x.detach(), a.detach().t()), {"split": True})
    torch.library.opcheck(lk.lora_dy_pass, (_small(5, 7), h, bb.detach(), 1.5))


def test_opcheck_bottleneck_ops():
    x, wd, bd, wu, bu = _small(5, 8, grad=True), _small(3, 8, grad=True), _small(3, grad=True), _small(8, 3, grad=True), _small(8, grad=True)
    torch.library.opcheck(bn.bottleneck_fwd, (x, wd, bd, wu, bu, None, "silu", 0.5, True))
    z = _small(5, 3)
    torch.library.opcheck(bn.bottleneck_bwd, (_small(5, 8), x.detach(), wd.detach(), wu.detach(), z, "silu", 0.5, True,
                                              torch.float32, torch.float32, [True] * 5))


@pytest.mark.parametrize("tuned", [None, "addmm"])
def test_compile_routes_by_the_tuned_table_without_timing(monkeypatch, tuned):
    """Under compile the route is the table's choice for the key, else the rule (fused); nothing is timed."""
    from lightning_peft.kernels import path_tuning

    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: True)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (9, 0))
    monkeypatch.delenv(dispatch.PATH_ENV_VAR, raising=False)
    monkeypatch.setenv("LIGHTNING_PEFT_AUTOTUNE", "1")
    monkeypatch.setattr(path_tuning, "time_paths", lambda *a, **k: pytest.fail("timed under compile"))
    m, _ = lora_tensors(seed=3)
    t = leaves({**m, "x": m["x"].repeat(1, 75, 1)}, torch.bfloat16, {"x", "lora_a", "lora_b"})  # 525 rows
    path_tuning.clear_tuned_paths()
    if tuned:
        key = path_tuning.path_key(t["x"], t["weight"], t["bias"], t["lora_a"], (9, 0))
        path_tuning._TABLE[key] = path_tuning.PathChoice(tuned, {})
    backend, seen = spying_backend()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda *a: lora_linear(*a, scale=0.5), backend=backend, fullgraph=True)
        compiled(*[t[k] for k in LORA]).sum().backward()
    finally:
        path_tuning.clear_tuned_paths()
        torch._dynamo.reset()
    expected = "lora_skinny" if tuned == "addmm" else "lora_fused_fwd"
    assert seen["forward"] == [f"lightning_peft.{expected}.default"]
