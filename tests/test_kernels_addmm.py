"""The cuBLAS-backed LoRA path (skinny rank-r kernels + addmm), the routing between LoRA paths, and the
bucketed autotune keys.

The path runs with its Triton skinny kernels (under TRITON_INTERPRET=1 on CPU) and with their PyTorch
references; both are judged like the fused kernels: against a float64 oracle, allowing a small multiple
of the reference's own error in the same dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import DEVICE, NEEDS_NEW_INTERPRETER, assert_like_reference, assert_rank_r_like_reference, base64, leaves, run_and_grads

from lightning_peft.kernels import dispatch, lora_linear, lora_linear_reference
from lightning_peft.kernels.lora_addmm import lora_linear_addmm

ORDER = ["x", "weight", "bias", "lora_a", "lora_b"]
SCALE = 1.75


def masters(lead, K, N, r, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return {"x": f(*lead, K), "weight": f(N, K) / math.sqrt(K), "bias": f(N) if bias else None,
            "lora_a": f(r, K) / math.sqrt(K), "lora_b": f(N, r) / math.sqrt(r)}, f(*lead, N)


def compare(fn, m, dy, dtype, trainable=("x", "lora_a", "lora_b"), factor=4.0, **kw):
    req = set(trainable)
    y64, g64 = run_and_grads(lora_linear_reference, leaves(m, torch.float64, req), dy, ORDER, scale=SCALE, **kw)
    ylp, glp = run_and_grads(lora_linear_reference, leaves(m, dtype, req), dy, ORDER, scale=SCALE, **kw)
    yk, gk = run_and_grads(fn, leaves(m, dtype, req), dy, ORDER, scale=SCALE, **kw)
    assert_like_reference("y", yk, ylp, y64, factor)
    assert_rank_r_like_reference("y", yk, ylp, y64, base64(m), factor)
    assert set(gk) == set(g64) == req
    for name in sorted(req):
        assert gk[name].dtype == dtype
        assert_like_reference(f"d{name}", gk[name], glp[name], g64[name], factor)


def addmm(ops):
    return lambda *a, **k: lora_linear_addmm(*a, ops=ops, **k)


OPS = ["triton", "torch"]


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("lead,K,N,r,bias", [((9, 41), 41, 37, 3, True), ((5, 31), 150, 70, 17, False),
                                             ((3, 7), 64, 64, 128, True)])
def test_fp32_output_and_gradients(ops, lead, K, N, r, bias):
    m, dy = masters(lead, K, N, r, bias)
    compare(addmm(ops), m, dy, torch.float32, trainable=("x", "weight", "bias", "lora_a", "lora_b") if bias else
            ("x", "lora_a", "lora_b"))


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_output_and_gradients(ops, dtype):
    m, dy = masters((9, 41), 41, 37, 8, True, seed=1)
    compare(addmm(ops), m, dy, dtype)


@pytest.mark.parametrize("ops", OPS)
def test_partly_trainable_and_decode_shape(ops):
    m, dy = masters((1,), 41, 37, 5, True, seed=2)  # M = 1: decoding
    compare(addmm(ops), m, dy, torch.float32, trainable=("lora_b",))
    compare(addmm(ops), m, dy, torch.float32, trainable=("x",))


@pytest.mark.parametrize("ops", OPS)
def test_dropout_matches_reference_with_the_same_rng_state(ops):
    m, dy = masters((9, 41), 41, 37, 8, True, seed=6)
    req = {"x", "lora_a", "lora_b"}
    torch.manual_seed(123)
    yk, gk = run_and_grads(addmm(ops), leaves(m, torch.float32, req), dy, ORDER, scale=SCALE, dropout_p=0.3)
    torch.manual_seed(123)
    yr, gr = run_and_grads(lora_linear_reference, leaves(m, torch.float32, req), dy, ORDER, scale=SCALE, dropout_p=0.3)
    y0, _ = run_and_grads(lora_linear_reference, leaves(m, torch.float32, req), dy, ORDER, scale=SCALE)
    assert not torch.allclose(yr, y0)  # the mask did something
    torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-5)
    for name in req:
        torch.testing.assert_close(gk[name], gr[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ops", [pytest.param(o, marks=NEEDS_NEW_INTERPRETER) if o == "triton" else o for o in OPS])
def test_gradcheck_float64(ops):
    m, _ = masters((2, 3), 5, 4, 3, True, seed=8)
    args = leaves(m, torch.float64, set(ORDER))
    assert torch.autograd.gradcheck(lambda *a: lora_linear_addmm(*a, SCALE, ops=ops), tuple(args[k] for k in ORDER),
                                    fast_mode=True)


def test_errors():
    x, w, a, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="lora_b must have shape"):
        lora_linear_addmm(x, w, None, a, b.t(), 1.0)
    with pytest.raises(TypeError, match="dtype mismatch: x is torch.float32 but lora_a is torch.float16"):
        lora_linear_addmm(x, w, None, a.half(), b, 1.0)
    with pytest.raises(ValueError, match="ops must be"):
        lora_linear_addmm(x, w, None, a, b, 1.0, ops="cublas")


# ---------------------------------------------------------------------------------- routing


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the kernels apply (CUDA tensors) on a GPU of the given compute capability."""
    monkeypatch.delenv(dispatch.PATH_ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: True)

    def set_capability(major):
        monkeypatch.setattr(dispatch, "_capability", lambda device: (major, 0))

    set_capability(9)
    return set_capability


ROUTES = [  # (dtype, needs_grad, rows, capability major, r, expected)
    (torch.bfloat16, True, 8192, 9, 16, "fused"),  # a bf16 training step on Hopper
    (torch.float16, True, 512, 9, 16, "fused"),
    (torch.float32, True, 8192, 9, 16, "addmm"),  # fp32 never reaches the fused GEMM's fp32 dots
    (torch.bfloat16, False, 8192, 9, 16, "addmm"),  # no_grad / eval
    (torch.bfloat16, True, 1, 9, 16, "addmm"),  # decoding
    (torch.bfloat16, True, 511, 9, 16, "addmm"),
    (torch.bfloat16, True, 8192, 8, 16, "addmm"),  # A100
    (torch.bfloat16, True, 8192, 10, 16, "addmm"),  # not Hopper
    (torch.bfloat16, True, 8192, 9, 129, "torch"),  # rank beyond the kernels: the same ordering in PyTorch
]


@pytest.mark.parametrize("dtype,grad,rows,major,r,expected", ROUTES)
def test_routing_table(gpu, dtype, grad, rows, major, r, expected):
    gpu(major)
    x, a = torch.empty(rows, 8, dtype=dtype), torch.empty(r, 8, dtype=dtype)
    assert dispatch.lora_route(x, a, grad) == expected


def test_routing_falls_back_to_pytorch_and_can_be_forced(gpu, monkeypatch):
    x, a = torch.empty(8192, 8), torch.empty(4, 8)
    monkeypatch.setenv(dispatch.PATH_ENV_VAR, "fused")
    assert dispatch.lora_route(x, a, True) == "fused"  # fp32 forced onto the fused path (benchmarks)
    monkeypatch.setenv(dispatch.PATH_ENV_VAR, "addmm")
    assert dispatch.lora_route(x.bfloat16(), a.bfloat16(), True) == "addmm"
    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: False)
    assert dispatch.lora_route(x, a, True) == "torch"


@pytest.mark.parametrize("case", ["fp32", "no_grad", "decode", "sm80", "fused_sm90"])
def test_each_routing_decision_matches_the_reference(gpu, monkeypatch, case):
    """lora_linear through each decision (the interpreter stands in for the GPU): output and every gradient."""
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    rows = 3 if case == "decode" else 520
    gpu(8 if case == "sm80" else 9)
    calls = []
    for name in ("lora_linear_triton", "lora_linear_addmm"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    m, dy = masters((rows,), 24, 40, 4, True, seed=12)
    if case == "no_grad":
        with torch.no_grad():
            y = lora_linear(*[leaves(m, dtype, set())[k] for k in ORDER], SCALE)
        ref = lora_linear_reference(*[leaves(m, dtype, set())[k] for k in ORDER], SCALE)
        y64 = lora_linear_reference(*[leaves(m, torch.float64, set())[k] for k in ORDER], SCALE)
        assert_like_reference("y", y, ref, y64)
    else:
        compare(lora_linear, m, dy, dtype, trainable=("x", "bias", "lora_a", "lora_b"))
    expected = "lora_linear_triton" if case == "fused_sm90" else "lora_linear_addmm"
    assert calls == [expected]


# ---------------------------------------------------------------------------------- autotune keys


@NEEDS_NEW_INTERPRETER
def test_row_counts_in_one_bucket_share_the_autotune_cache_key(monkeypatch):
    """Padded batches of a new length re-use the tuned configs of their power-of-two bucket."""
    from lightning_peft.kernels import bottleneck, lora
    from lightning_peft.kernels.dispatch import adapter_bottleneck_triton, lora_linear_triton

    monkeypatch.setenv("LIGHTNING_PEFT_AUTOTUNE", "0")  # the first config, put in the cache without timing
    monkeypatch.setenv("LIGHTNING_PEFT_TMA", "0")  # the pointer GEMM (its TMA twin has the same key)
    kernels = {n: getattr(lora, n) for n in ("_gemm_lora_kernel", "_skinny_kernel", "_dy_pass_kernel")}
    kernels |= {n: getattr(bottleneck, n) for n in ("_adapter_fwd_kernel", "_adapter_bwd_dz_kernel", "_adapter_bwd_cols_kernel")}
    for k in kernels.values():
        monkeypatch.setattr(k, "configs", k.configs * 2)  # two configs: the autotuner keys its cache
        monkeypatch.setattr(k, "cache", {})

    def step(rows):
        m, dy = masters((rows,), 24, 40, 4, False, seed=rows)
        run_and_grads(lora_linear_triton, leaves(m, torch.float16, {"x", "lora_a", "lora_b"}), dy, ORDER, scale=SCALE)
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, 24, generator=g, dtype=torch.float16, device=DEVICE, requires_grad=True)
        ws = [torch.randn(*s, generator=g).to(DEVICE, torch.float16).requires_grad_() for s in ((8, 24), (8,), (24, 8), (24,))]
        adapter_bottleneck_triton(x, *ws).sum().backward()
        return {n: len(k.cache) for n, k in kernels.items()}

    first = step(130)
    assert first == {"_gemm_lora_kernel": 2, "_skinny_kernel": 2, "_dy_pass_kernel": 1, "_adapter_fwd_kernel": 1,
                     "_adapter_bwd_dz_kernel": 1, "_adapter_bwd_cols_kernel": 1}  # forward/dx GEMM, h/dA skinny
    assert step(250) == first  # same bucket (256): no new key, no re-tuning
    assert all(n > first[name] for name, n in step(300).items())  # the next bucket (512) tunes anew
