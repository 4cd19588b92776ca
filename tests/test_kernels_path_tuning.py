"""The per-shape choice between the fused LoRA GEMM and the cuBLAS-backed path (kernels/path_tuning.py).

The GPU is pretended (capability 9.0, ``will_use_triton`` true for CPU tensors) and the timing is mocked, so
these run on CPU in milliseconds: the route follows the timings, each key is timed once (row counts in one
bucket share it), and ``LIGHTNING_PEFT_AUTOTUNE=0``, a forced path, the fixed ``addmm`` cases and compile
tracing never time.
"""

from __future__ import annotations

import pytest
import torch

from lightning_peft.kernels import dispatch, path_tuning
from lightning_peft.kernels.limits import AUTOTUNE_ENV_VAR, m_bucket
from lightning_peft.kernels.path_tuning import clear_tuned_paths, tuned_paths

K = 32
FASTER = {64: "fused", 96: "addmm"}  # N -> the path the mocked timing makes faster


@pytest.fixture
def timed(monkeypatch):
    """A Hopper GPU with autotuning on and a mocked timing; returns the list of timed (rows, N)."""
    monkeypatch.delenv(dispatch.PATH_ENV_VAR, raising=False)
    monkeypatch.setenv(AUTOTUNE_ENV_VAR, "1")
    monkeypatch.setattr(dispatch, "will_use_triton", lambda t: True)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (9, 0))
    calls = []

    def fake_time_paths(x, weight, bias, lora_a, reps=path_tuning.REPS):
        n = weight.shape[0]
        calls.append((x.numel() // x.shape[-1], n))
        return {"fused": 1.0, "addmm": 2.0} if FASTER[n] == "fused" else {"fused": 2.0, "addmm": 1.0}

    monkeypatch.setattr(path_tuning, "time_paths", fake_time_paths)
    clear_tuned_paths()
    yield calls
    clear_tuned_paths()


def route(rows, n, dtype=torch.bfloat16, grad=True, r=8, bias=False, weight=True):
    x, a = torch.empty(rows, K, dtype=dtype), torch.empty(r, K, dtype=dtype)
    w = torch.empty(n, K, dtype=dtype) if weight else None
    b = torch.empty(n, dtype=dtype) if bias else None
    return dispatch.lora_route(x, a, grad, w, b)


def test_route_follows_the_timings_and_times_once_per_key(timed):
    assert route(1024, 64) == "fused"
    assert route(1024, 96) == "addmm"
    assert timed == [(1024, 64), (1024, 96)]
    assert route(600, 96) == "addmm" and route(1000, 64) == "fused"  # same bucket as 1024: cached
    assert len(timed) == 2
    assert route(1025, 96) == "addmm"  # the next bucket: timed again
    assert route(1024, 96, bias=True) == "addmm"  # bias is part of the key
    assert len(timed) == 4
    table = tuned_paths()
    assert {(k.m_bucket, k.n, k.bias, v.path) for k, v in table.items()} == {
        (1024, 64, False, "fused"), (1024, 96, False, "addmm"), (2048, 96, False, "addmm"), (1024, 96, True, "addmm")}
    assert all(k.capability == (9, 0) and k.dtype == torch.bfloat16 and (k.k, k.r) == (K, 8) for k in table)
    clear_tuned_paths()
    assert tuned_paths() == {}
    route(1024, 64)
    assert len(timed) == 5


def test_key_separates_layout_base_training_rank_and_dtype():
    x, a = torch.empty(700, K), torch.empty(4, K)
    w = torch.empty(48, K)
    key = path_tuning.path_key(x, w, None, a, (9, 0))
    assert key.m_bucket == m_bucket(700) == 1024 and (key.n, key.k, key.r) == (48, K, 4)
    assert not key.weight_transposed and not key.base_trainable
    assert path_tuning.path_key(x, torch.empty(K, 48).t(), None, a, (9, 0)).weight_transposed  # GPT-2's Conv1D
    assert path_tuning.path_key(x, w.requires_grad_(), None, a, (9, 0)).base_trainable
    assert path_tuning.path_key(x.view(7, 100, K), w, None, a, (9, 0)).m_bucket == 1024  # leading dims flattened
    assert path_tuning.path_key(x.half(), w, None, a, (9, 0)).dtype == torch.float16


@pytest.mark.parametrize("case", ["autotune_off", "forced_fused", "forced_addmm"])
def test_autotune_off_and_forced_path_skip_the_timing(timed, monkeypatch, case):
    if case == "autotune_off":
        monkeypatch.setenv(AUTOTUNE_ENV_VAR, "0")
        expected = "fused"  # the fixed rule
    else:
        expected = case.split("_")[1]
        monkeypatch.setenv(dispatch.PATH_ENV_VAR, expected)
    assert route(1024, 96) == expected
    assert timed == [] and tuned_paths() == {}


@pytest.mark.parametrize("kw", [dict(dtype=torch.float32), dict(grad=False), dict(rows=511), dict(rows=1), dict(major=8),
                                dict(major=10)])
def test_fixed_addmm_cases_never_time(timed, monkeypatch, kw):
    major = kw.pop("major", 9)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (major, 0))
    assert route(**{"rows": 1024, "n": 64, **kw}) == "addmm"
    assert timed == [] and tuned_paths() == {}


def test_rank_beyond_the_kernels_and_calls_without_weight_never_time(timed):
    assert route(1024, 64, r=129) == "torch"
    assert route(1024, 64, weight=False) == "fused"  # lora_linear_multi's extra branches: the rule, no timing
    assert timed == []


def test_lora_linear_takes_the_tuned_path(timed, monkeypatch):
    calls = []
    for name in ("lora_linear_triton", "lora_linear_addmm"):
        monkeypatch.setattr(dispatch, name, lambda *a, _n=name, **k: calls.append(_n))
    x = torch.randn(2, 300, K, dtype=torch.bfloat16, requires_grad=True)
    a, b = torch.randn(8, K, dtype=torch.bfloat16), torch.randn(96, 8, dtype=torch.bfloat16)
    dispatch.lora_linear(x, torch.randn(96, K, dtype=torch.bfloat16), None, a, b, 1.0)
    dispatch.lora_linear(x, torch.randn(64, K, dtype=torch.bfloat16), None, a, b[:64], 1.0)
    assert calls == ["lora_linear_addmm", "lora_linear_triton"] and len(timed) == 2
    with torch.no_grad():  # eval: addmm by rule, nothing timed
        dispatch.lora_linear(x, torch.randn(80, K, dtype=torch.bfloat16), None, a, b[:80], 1.0)
    assert calls[-1] == "lora_linear_addmm" and len(timed) == 2


def test_under_compile_tracing_the_table_or_the_rule_without_timing(timed, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert route(1024, 96) == "fused"  # nothing tuned yet: the rule
    assert timed == [] and tuned_paths() == {}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert route(1024, 96) == "addmm"  # an eager call times it
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert route(600, 96) == "addmm"  # the table's choice under compile
    assert len(timed) == 1


def test_real_timing_never_runs_on_cpu():
    x, w, a = torch.empty(1024, K, dtype=torch.bfloat16), torch.empty(64, K, dtype=torch.bfloat16), torch.empty(8, K)
    assert path_tuning.time_paths(x, w, None, a) == {}


@pytest.mark.parametrize("transposed,base_trains", [(False, False), (True, True)])
def test_timing_body_runs_both_paths_apart_from_the_callers_autograd_and_rng(transposed, base_trains):
    """The timing itself on CPU (interpreter kernels, a CPU timer): both paths run forward and backward on fresh
    tensors; the caller's gradients, saved-tensor hooks (checkpointing) and RNG stream are untouched."""
    pytest.importorskip("triton")
    N, r = 20, 4
    x = torch.randn(3, 8, K, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(K, N).t() if transposed else torch.randn(N, K)).bfloat16().requires_grad_(base_trains)
    b = torch.randn(N, dtype=torch.bfloat16, requires_grad=base_trains)
    a = torch.randn(r, K, requires_grad=True)  # fp32 adapter masters on a bf16 base
    grads = []

    def timer(fn, reps):
        grads.append(fn())
        return float(len(grads))

    def refuse(t):
        raise AssertionError("the caller's saved-tensor hooks were used")

    rng = torch.get_rng_state()
    with torch.autograd.graph.saved_tensors_hooks(refuse, refuse):
        times = path_tuning.time_paths(x, w, b, a, timer=timer)
    assert times == {"fused": 1.0, "addmm": 2.0}
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(t.grad is None for t in (x, w, b, a))
    n_inputs = 5 if base_trains else 3  # x, A, B (+ W, bias)
    for g in grads:
        assert len(g) == n_inputs and all(torch.isfinite(t).all() for t in g)
    for gf, ga in zip(*grads):  # the two paths compute the same gradients
        torch.testing.assert_close(gf.float(), ga.float(), rtol=0.05, atol=0.05)
