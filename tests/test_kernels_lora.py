"""Fused LoRA linear: the Triton kernels against the PyTorch reference, and the dispatch.

On CPU the real kernels run under TRITON_INTERPRET=1 (set in conftest.py); on CUDA natively.
Every output and gradient is judged against a float64 oracle, allowing a small multiple of the
reference's own error in the same dtype (Liger-Kernel's approach).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from kernel_checks import (
    CUDA,
    DEVICE,
    NEEDS_NEW_INTERPRETER,
    assert_like_reference,
    assert_rank_r_like_reference,
    base64,
    leaves,
    run_and_grads,
)

from lightning_peft.kernels import (
    dispatch,
    kernels_enabled,
    lora_linear,
    lora_linear_reference,
    lora_linear_triton,
    set_kernels_enabled,
    use_kernels,
)

ORDER = ["x", "weight", "bias", "lora_a", "lora_b"]
SCALE = 1.75


def masters(lead, K, N, r, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return {
        "x": f(*lead, K),
        "weight": f(N, K) / math.sqrt(K),
        "bias": f(N) if bias else None,
        "lora_a": f(r, K) / math.sqrt(K),
        "lora_b": f(N, r) / math.sqrt(r),  # non-zero B so that every gradient is exercised
    }, f(*lead, N)


def compare(m, dy, dtype, trainable=("x", "lora_a", "lora_b"), factor=4.0, **kw):
    """Triton in ``dtype`` vs reference in ``dtype`` vs reference in float64, output and grads."""
    req = set(trainable)
    y64, g64 = run_and_grads(lora_linear_reference, leaves(m, torch.float64, req), dy, ORDER, scale=SCALE, **kw)
    ylp, glp = run_and_grads(lora_linear_reference, leaves(m, dtype, req), dy, ORDER, scale=SCALE, **kw)
    yk, gk = run_and_grads(lora_linear_triton, leaves(m, dtype, req), dy, ORDER, scale=SCALE, **kw)
    assert_like_reference("y", yk, ylp, y64, factor)
    if not kw.get("dropout_p"):
        assert_rank_r_like_reference("y", yk, ylp, y64, base64(m), factor)
    assert set(gk) == set(g64) == req
    for name in sorted(req):
        assert gk[name].dtype == dtype
        assert_like_reference(f"d{name}", gk[name], glp[name], g64[name], factor)


# (leading dims, K, N, r, bias): 3-D and 2-D inputs, odd sizes, several K/N/M blocks, r from 3 to 128
CASES = [
    ((9, 41), 41, 37, 3, True),
    ((37,), 41, 37, 8, False),
    ((5, 31), 150, 70, 17, True),
    ((9,), 41, 37, 16, True),
    ((3, 7), 64, 64, 128, False),
]


@pytest.mark.parametrize("lead,K,N,r,bias", CASES)
def test_fp32_output_and_gradients(lead, K, N, r, bias):
    m, dy = masters(lead, K, N, r, bias)
    compare(m, dy, torch.float32)


@pytest.mark.parametrize("lead,K,N,r,bias", [CASES[0], CASES[2]])
def test_fp16_output_and_gradients(lead, K, N, r, bias):
    m, dy = masters(lead, K, N, r, bias, seed=1)
    compare(m, dy, torch.float16)


@pytest.mark.parametrize("lead,K,N,r,bias", [CASES[0], CASES[2]])
def test_bf16_output_and_gradients(lead, K, N, r, bias):
    # under the interpreter bf16 operands are widened to fp32 inside the kernels (same products and sums)
    m, dy = masters(lead, K, N, r, bias, seed=2)
    compare(m, dy, torch.bfloat16)


class _LaunchSpy:
    """Stands in for an autotuned kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def gemm_spies(monkeypatch):
    from lightning_peft.kernels import lora

    spies = {n: _LaunchSpy(getattr(lora, n)) for n in ("_gemm_lora_kernel", "_gemm_lora_tma_kernel")}
    for n, spy_ in spies.items():
        monkeypatch.setattr(lora, n, spy_)
    return spies


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_gemm_variant(monkeypatch, gemm_spies, dtype):
    # the Hopper path (TMA descriptors, no masks in the main loop); forced on, it runs under the
    # interpreter too when rows are 16-byte aligned (K, N multiples of 8 in 16-bit)
    monkeypatch.setenv("LIGHTNING_PEFT_TMA", "1")
    m, dy = masters((5, 31), 152, 72, 8, True, seed=10)
    compare(m, dy, dtype, trainable=("x", "lora_a", "lora_b"))
    assert gemm_spies["_gemm_lora_tma_kernel"].launches == 2  # forward and dx
    assert gemm_spies["_gemm_lora_kernel"].launches == 0
    m, dy = masters((9, 41), 41, 37, 8, True, seed=10)  # rows not 16-byte aligned: pointer kernel
    compare(m, dy, dtype, trainable=("x",))
    assert gemm_spies["_gemm_lora_kernel"].launches == 2


def test_tma_is_off_by_default_on_cpu(monkeypatch, gemm_spies):
    monkeypatch.delenv("LIGHTNING_PEFT_TMA", raising=False)
    m, dy = masters((5, 31), 152, 72, 8, True, seed=11)
    compare(m, dy, torch.float16, trainable=("x",))
    assert gemm_spies["_gemm_lora_tma_kernel"].launches == 0 or CUDA


def test_trainable_base_weight_and_bias_get_gradients():
    m, dy = masters((9, 41), 41, 37, 8, True, seed=3)
    compare(m, dy, torch.float32, trainable=("x", "weight", "bias", "lora_a", "lora_b"))


def test_only_lora_b_trainable_and_input_without_grad():
    m, dy = masters((9, 41), 41, 37, 5, True, seed=4)
    compare(m, dy, torch.float32, trainable=("lora_b",))
    compare(m, dy, torch.float32, trainable=("lora_a",))


def test_the_rank_r_check_catches_a_dropped_rank_r_term_that_the_output_check_misses():
    # B·0.02: the rank-r term is ~1% of y, inside the output check's floor (8 bf16 ulps of max|y|)
    m, _ = masters((64, 9), 41, 37, 8, True, seed=13)
    m["lora_b"] = m["lora_b"] * 0.02
    args = lambda dtype: [leaves(m, dtype, set())[k] for k in ORDER]
    y64, ylp = lora_linear_reference(*args(torch.float64), SCALE), lora_linear_reference(*args(torch.bfloat16), SCALE)
    dropped = torch.nn.functional.linear(*args(torch.bfloat16)[:3])  # a kernel that forgot s·(x·Aᵀ)·Bᵀ
    assert_like_reference("y", dropped, ylp, y64)
    with pytest.raises(AssertionError, match="rank-r part"):
        assert_rank_r_like_reference("y", dropped, ylp, y64, base64(m))
    assert_rank_r_like_reference("y", ylp, ylp, y64, base64(m))


def test_zero_b_gives_base_output_and_a_zero_grad_for_a():
    m, dy = masters((9, 41), 41, 37, 4, True, seed=5)
    m["lora_b"] = torch.zeros_like(m["lora_b"])
    args = leaves(m, torch.float32, {"lora_a", "lora_b"})
    y, g = run_and_grads(lora_linear_triton, args, dy, ORDER, scale=SCALE)
    base = torch.nn.functional.linear(args["x"], args["weight"], args["bias"])
    torch.testing.assert_close(y, base.detach())
    assert torch.count_nonzero(g["lora_a"]) == 0 and torch.count_nonzero(g["lora_b"]) > 0


def test_dropout_matches_reference_with_the_same_rng_state():
    m, dy = masters((9, 41), 41, 37, 8, True, seed=6)
    req = {"x", "lora_a", "lora_b"}
    torch.manual_seed(123)
    yk, gk = run_and_grads(lora_linear_triton, leaves(m, torch.float32, req), dy, ORDER, scale=SCALE, dropout_p=0.3)
    torch.manual_seed(123)
    yr, gr = run_and_grads(lora_linear_reference, leaves(m, torch.float32, req), dy, ORDER, scale=SCALE, dropout_p=0.3)
    y0, _ = run_and_grads(lora_linear_reference, leaves(m, torch.float32, req), dy, ORDER, scale=SCALE)
    assert not torch.allclose(yr, y0)  # the mask did something
    torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-5)
    for name in req:
        torch.testing.assert_close(gk[name], gr[name], rtol=1e-4, atol=1e-4)


def test_non_contiguous_input():
    m, _ = masters((41, 9), 41, 37, 8, True, seed=7)
    args = leaves(m, torch.float32, {"lora_a", "lora_b"})
    xt = args["x"].transpose(0, 1)  # (9, 41, K) view, not contiguous
    yk = lora_linear_triton(xt, args["weight"], args["bias"], args["lora_a"], args["lora_b"], SCALE)
    yr = lora_linear_reference(xt.contiguous(), args["weight"], args["bias"], args["lora_a"], args["lora_b"], SCALE)
    torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="float64 Triton dots are an interpreter-only path (dispatch uses the reference)")
@NEEDS_NEW_INTERPRETER
def test_gradcheck_float64():
    m, _ = masters((2, 3), 5, 4, 3, True, seed=8)
    args = leaves(m, torch.float64, set(ORDER))

    def f(x, w, b, a, bb):
        return lora_linear_triton(x, w, b, a, bb, SCALE)

    assert torch.autograd.gradcheck(f, tuple(args[k] for k in ORDER), fast_mode=True)


def test_autocast_bf16_matches_f_linear_semantics():
    m, dy = masters((9, 41), 41, 37, 8, True, seed=9)
    req = {"x", "lora_a", "lora_b"}
    a_k, a_r = leaves(m, torch.float32, req), leaves(m, torch.float32, req)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        yk = lora_linear_triton(*[a_k[k] for k in ORDER], SCALE)
        yr = lora_linear_reference(*[a_r[k] for k in ORDER], SCALE)
    assert yk.dtype == yr.dtype == torch.bfloat16
    yk.backward(dy.to(DEVICE, torch.bfloat16))
    yr.backward(dy.to(DEVICE, torch.bfloat16))
    torch.testing.assert_close(yk.float(), yr.float(), rtol=2e-2, atol=5e-2)
    for name in req:
        assert a_k[name].grad.dtype == torch.float32  # gradients flow back to the fp32 leaves
        ref = a_r[name].grad
        torch.testing.assert_close(a_k[name].grad, ref, rtol=2e-2, atol=3e-2 * ref.abs().max().item())


# ---------------------------------------------------------------------------------- bad inputs


def _args(K=8, N=6, r=4):
    return torch.randn(3, K), torch.randn(N, K), torch.randn(N), torch.randn(r, K), torch.randn(N, r)


@pytest.mark.parametrize("fn", [lora_linear, lora_linear_reference, lora_linear_triton])
def test_shape_errors_name_the_argument(fn):
    x, w, b, a, bb = _args()
    with pytest.raises(ValueError, match="lora_b must have shape"):
        fn(x, w, b, a, torch.randn(6, 3), 1.0)
    with pytest.raises(ValueError, match="lora_a must have shape"):
        fn(x, w, b, torch.randn(4, 7), bb, 1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        fn(torch.randn(3, 5), w, b, a, bb, 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        fn(x, w, torch.randn(5), a, bb, 1.0)


def test_triton_rank_limit_dtype_and_dropout_errors():
    x, w, b, a, bb = _args(r=129)
    with pytest.raises(ValueError, match=r"rank r=129 .* maximum 128"):
        lora_linear_triton(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), a.to(DEVICE), bb.to(DEVICE), 1.0)
    x, w, b, a, bb = (t.to(DEVICE) for t in _args())
    with pytest.raises(TypeError, match="dtype mismatch: x is torch.float32 but lora_a is torch.float16"):
        lora_linear_triton(x, w, b, a.half(), bb, 1.0)
    with pytest.raises(TypeError, match="int64"):
        lora_linear_triton(x.long(), w.long(), None, a.long(), bb.long(), 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_triton(x, w, b, a, bb, 1.0, dropout_p=1.0)


def test_dispatch_falls_back_to_the_reference_for_rank_above_128():
    x, w, b, a, bb = _args(r=130)
    torch.testing.assert_close(lora_linear(x, w, b, a, bb, 0.5), lora_linear_reference(x, w, b, a, bb, 0.5))


# ---------------------------------------------------------------------------------- dispatch


@pytest.fixture
def spy(monkeypatch):
    """Records calls to the Triton entry points that dispatch would make."""
    calls = []
    real = dispatch.lora_linear_triton

    def fake(*args, **kwargs):
        calls.append("triton")
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "lora_linear_triton", fake)
    return calls


@pytest.fixture
def clean_switch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    previous = set_kernels_enabled(None)
    yield
    set_kernels_enabled(previous)


def test_cpu_tensors_use_the_reference(spy, clean_switch):
    x, w, b, a, bb = _args()
    assert kernels_enabled()
    torch.testing.assert_close(lora_linear(x, w, b, a, bb, 2.0), lora_linear_reference(x, w, b, a, bb, 2.0))
    assert spy == []


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_tensors_use_triton_unless_turned_off(spy, clean_switch, monkeypatch):
    x, w, b, a, bb = (t.cuda() for t in _args())
    lora_linear(x, w, b, a, bb, 2.0)
    assert spy == ["triton"]
    with use_kernels(False):
        lora_linear(x, w, b, a, bb, 2.0)
    monkeypatch.setenv(dispatch.ENV_VAR, "0")
    lora_linear(x, w, b, a, bb, 2.0)
    lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)  # float64: reference
    assert spy == ["triton"]


def test_use_kernels_restores_the_previous_state(clean_switch):
    assert kernels_enabled()
    with use_kernels(False):
        assert not kernels_enabled()
        with use_kernels(True):
            assert kernels_enabled()
        assert not kernels_enabled()
    assert kernels_enabled()
    set_kernels_enabled(False)
    with use_kernels(True):
        assert kernels_enabled()
    assert not kernels_enabled()


def test_use_kernels_restores_on_exception(clean_switch):
    with pytest.raises(RuntimeError), use_kernels(False):
        raise RuntimeError("boom")
    assert kernels_enabled()


@pytest.mark.parametrize("value,enabled", [("0", False), ("false", False), ("off", False), ("1", True), ("", True)])
def test_env_var(monkeypatch, clean_switch, value, enabled):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    assert kernels_enabled() is enabled
    with use_kernels(True):  # the explicit switch wins over the env var
        assert kernels_enabled()
    assert kernels_enabled() is enabled


def test_autotune_switch(monkeypatch):
    from lightning_peft.kernels._triton_common import AUTOTUNE_ENV_VAR, prune_configs

    configs = ["first", "second", "third"]
    monkeypatch.setenv(AUTOTUNE_ENV_VAR, "0")
    assert prune_configs(configs, {}) == ["first"]
    monkeypatch.setenv(AUTOTUNE_ENV_VAR, "1")
    assert prune_configs(configs, {}) == configs


def test_importing_the_package_does_not_load_the_triton_kernel_modules():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # triton unimportable
        "import torch, lightning_peft.kernels as k\n"
        "x = torch.randn(3, 8)\n"
        "y = k.lora_linear(x, torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), 1.0)\n"
        "z = k.adapter_bottleneck(x, torch.randn(4, 8), None, torch.randn(8, 4), None)\n"
        "assert not k.triton_available()\n"
        "loaded = [m for m in ('lightning_peft.kernels.lora', 'lightning_peft.kernels.bottleneck') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---------------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M,K,N", [(8192, 4096, 4096), (16384, 2048, 2048), (8192, 4096, 14336)])
def test_benchmark_shapes_bf16_on_gpu(monkeypatch, M, K, N):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator(device="cuda").manual_seed(0)
    f = lambda *s: torch.randn(*s, device="cuda", generator=g)
    m = {"x": f(M, K), "weight": f(N, K) / K**0.5, "bias": None, "lora_a": f(16, K) / K**0.5, "lora_b": f(N, 16) * 0.1}
    dy = f(M, N)
    req = {"x", "lora_a", "lora_b"}
    y32, g32 = run_and_grads(lora_linear_reference, leaves(m, torch.float32, req, "cuda"), dy, ORDER, scale=2.0)
    ylp, glp = run_and_grads(lora_linear_reference, leaves(m, torch.bfloat16, req, "cuda"), dy, ORDER, scale=2.0)
    yk, gk = run_and_grads(lora_linear_triton, leaves(m, torch.bfloat16, req, "cuda"), dy, ORDER, scale=2.0)
    assert_like_reference("y", yk, ylp, y32)
    assert_rank_r_like_reference("y", yk, ylp, y32, base64({k: v.to(torch.bfloat16) if v is not None else v for k, v in m.items()}))
    for name in req:
        assert_like_reference(f"d{name}", gk[name], glp[name], g32[name])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_gpu_while_current_device_is_0():
    m, dy = masters((9, 41), 41, 37, 8, True)
    req = {"x", "lora_a", "lora_b"}
    torch.cuda.set_device(0)
    yk, gk = run_and_grads(lora_linear_triton, leaves(m, torch.float32, req, "cuda:1"), dy, ORDER, scale=SCALE)
    yr, gr = run_and_grads(lora_linear_reference, leaves(m, torch.float32, req, "cuda:1"), dy, ORDER, scale=SCALE)
    assert yk.device == torch.device("cuda:1")
    torch.testing.assert_close(yk, yr, rtol=1e-4, atol=1e-4)
    for name in req:
        torch.testing.assert_close(gk[name], gr[name], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------- scripts

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.mark.skipif(CUDA, reason="checks the no-GPU path")
def test_benchmark_without_cuda_exits_with_a_message():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_kernels.py")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_a_gpu():  # ~10-40 s of compiling: -m slow
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "check_kernels_compile.py"), "--first-config-only",
                          "--dtypes", "bf16"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all kernels compile" in out.stdout


@pytest.mark.slow
def test_benchmark_script_runs_end_to_end_on_cpu(tmp_path):
    # the benchmark's own code path (checks, table, JSON) through the interpreter at tiny shapes
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench_kernels.py"), "--cpu-smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    data = json.loads(out.read_text())
    assert all(c["passed"] for c in data["checks"]) and len(data["checks"]) == 4  # gemm, lora fused/addmm, adapter
    assert any(t["tensor"] == "y_rank_r" for c in data["checks"] for t in c["tensors"])
    names = {(r["kind"], r["name"]) for r in data["results"]}
    assert {("lora", "frozen_linear"), ("lora", "triton"), ("lora", "addmm"), ("lora", "dispatch"),
            ("gemm", "fwd_cublas"), ("gemm", "dgrad_triton"), ("adapter", "residual_floor"), ("adapter", "triton")} <= names
