"""Benchmark the fused LoRA and adapter kernels against their floors, eager, torch.compile and HF PEFT.

Needs a CUDA GPU (without one it says so and exits with status 2). For each shape it measures
forward+backward time (``triton.testing.do_bench``), forward time and the peak extra memory of one
forward+backward, in bf16, and prints every time as a ratio to the floor measured in the same run:

* LoRA, r=16, frozen base weight, (M tokens, K→N) = (8192, 4096→4096), (16384, 2048→2048),
  (8192, 4096→14336): floor = the frozen base linear alone (``F.linear``, no bias); rows for the
  eager reference (``lora_linear_reference``), ``torch.compile`` of it, our Triton kernels
  (``lora_linear_triton``; on sm_90+ also ``triton_no_tma``, the pointer-based GEMM instead of the
  TMA one) and HF PEFT's LoRA layer when ``peft`` imports.
* The same LoRA rows also for ``addmm`` (the cuBLAS-backed path: skinny Triton kernels for the rank-r
  terms, ``addmm`` with beta=1 for the big GEMMs) and ``dispatch`` (``lora_linear``, the path it picks);
  after them one line says which path the per-shape tuner (``kernels/path_tuning.py``) picked and the
  times it measured (also in the JSON, ``autotuned["lora_path"]``).
* Bare GEMM at the LoRA shapes (``--only gemm``): our Triton GEMM without the rank-r epilogue against
  cuBLAS, forward ``x·Wᵀ`` vs ``F.linear`` and dgrad ``dy·W`` vs ``dy @ W`` (also without TMA on sm_90+),
  with a parity check of their values: one ratio that says whether the fused path's GEMM can win.
* Bottleneck adapter, m=64, GELU, residual = x, (M, d) = (8192, 4096): floor = the residual
  alone (``x * 1.0``: read x, write y; backward read dy, write dx); rows for eager, compiled and
  Triton.

Peak extra memory is the memory allocated during one forward+backward above what is held
between steps; for LoRA the Triton row is "met" within 5% of the
frozen base layer's (x·Aᵀ and dh, M×r each, come on top of it).

Targets, ratios to the floor from the same run:

* LoRA forward+backward <= 1.10x the frozen base linear at (8192, 4096→4096), <= 1.25x at
  (16384, 2048→2048) and <= 1.08x at (8192, 4096→14336); peak extra memory no more than the frozen
  base layer's (judged for the ``triton``, ``addmm`` and ``dispatch`` rows).
* Adapter forward+backward <= 2.5x the residual-only floor at (8192, 4096).

Before timing, the Triton outputs and gradients are checked against the reference at bf16
tolerance (error vs an fp32 reference no more than 4x the bf16 reference's own, plus a few ulps), and
the rank-r part ``y - x·Wᵀ`` separately (its floor from its own size, so a dropped rank-r term fails).
Results go to stdout as a table and to ``--out`` as JSON (with the autotuned configs).

    python scripts/bench_kernels.py --out bench_kernels.json
    python scripts/bench_kernels.py --skip-compile --only lora     # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

LORA_SHAPES = [(8192, 4096, 4096), (16384, 2048, 2048), (8192, 4096, 14336)]
ADAPTER_SHAPES = [(8192, 4096)]
DEV = "cuda"
SMOKE = False  # --cpu-smoke: the whole script on CPU through the Triton interpreter, tiny shapes, no timing
RANK, ALPHA, BOTTLENECK = 16, 32, 64
TARGETS = {("lora", 8192, 4096, 4096): 1.10, ("lora", 16384, 2048, 2048): 1.25, ("lora", 8192, 4096, 14336): 1.08,
           ("adapter", 8192, 4096, 4096): 2.5}
TARGET_ROWS = ("triton", "addmm", "dispatch")  # rows judged against the targets (fused, cuBLAS-backed, what lora_linear picks)


def bench(step, params, x, dy, rep):
    """(fwd+bwd ms, fwd ms, peak extra MiB) of ``y = step(x)``; ``y.backward(dy)``."""
    def fb():
        x.grad = None
        for p in params:
            p.grad = None
        step(x).backward(dy)

    def fwd():
        with torch.no_grad():
            step(x)

    if SMOKE:
        t0 = time.perf_counter()
        fb()
        t1 = time.perf_counter()
        fwd()
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, 0.0
    from triton.testing import do_bench

    for _ in range(3):  # compile, autotune, warm the allocator
        fb()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fb()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return do_bench(fb, warmup=25, rep=rep), do_bench(fwd, warmup=25, rep=rep), peak


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(name, fn_k, fn_r, inputs, dy, names=None, base=None):
    """Liger-style: |triton - ref32| <= 4·|ref16 - ref32| + 8 ulp·max|ref32|, output and every grad.

    With ``base`` (x·Wᵀ in fp32 from the same inputs) the rank-r part ``y - x·Wᵀ`` is judged too, its floor
    taken from its own size: with B·0.01 the rank-r term is ~1% of y, so the bound on y alone (6.25% of
    max|y| from the floor) would pass a kernel that dropped it.
    """

    def run(fn, dtype):
        ts = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
        y = fn(*ts)
        y.backward(dy.to(dtype))
        return [y.detach()] + [t.grad for t in ts if t is not None and t.requires_grad]

    ref32, ref16, got = run(fn_r, torch.float32), run(fn_r, torch.bfloat16), run(fn_k, torch.bfloat16)
    out, ok = [], True
    names = names or ["y"] + [f"grad{i}" for i in range(1, len(got))]
    triples = list(zip(names, got, ref16, ref32))
    if base is not None:  # the rank-r part: the same errors, the floor from max|y - x·Wᵀ|
        triples.append(("y_rank_r", got[0], ref16[0], ref32[0], (ref32[0].double() - base.double()).abs().max().item()))
    for tensor, g, r16, r32, *size in triples:
        e, e_ref = max_err(g, r32), max_err(r16, r32)
        bound = 4 * e_ref + 8 * 2**-7 * (size[0] if size else r32.abs().max().item())
        ok &= bool(math.isfinite(e) and e <= bound)
        out.append(dict(tensor=tensor, err=e, ref_bf16_err=e_ref, bound=bound))
    print(f"  check {name}: {'PASS' if ok else 'FAIL'} "
          + ", ".join(f"{o['tensor']} {o['err']:.2e}/{o['bound']:.2e}" for o in out), flush=True)
    return dict(name=name, passed=ok, tensors=out)


def peft_lora(K, N, dev, dt):
    from peft import LoraConfig, get_peft_model

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(K, N, bias=False)

        def forward(self, x):
            return self.proj(x)

    m = get_peft_model(Wrap(), LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"]))
    m = m.to(dev, dt)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return m, [p for p in m.parameters() if p.requires_grad]


def run_lora(M, K, N, args, results, checks):
    from lightning_peft.kernels import lora_linear, lora_linear_reference, lora_linear_triton
    from lightning_peft.kernels.lora_addmm import lora_linear_addmm

    dev, dt = DEV, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    W = (torch.randn(N, K, device=dev, generator=g) / K**0.5).to(dt)
    A = (torch.randn(RANK, K, device=dev, generator=g) / K**0.5).to(dt).requires_grad_()
    B = (torch.randn(N, RANK, device=dev, generator=g) * 0.01).to(dt).requires_grad_()
    x = torch.randn(M, K, device=dev, dtype=dt, generator=g).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=dt, generator=g)
    s = ALPHA / RANK

    inputs = [x.detach().float().requires_grad_(), W.float(), A.detach().float().requires_grad_(),
              B.detach().float().requires_grad_()]
    base = F.linear(x.detach().double(), W.double())
    for path, fn in (("fused", lora_linear_triton), ("addmm", lora_linear_addmm)):
        checks.append(check(f"lora {path} {M}x{K}->{N}",
                            lambda x_, w_, a_, b_, fn=fn: fn(x_, w_, None, a_, b_, s),
                            lambda x_, w_, a_, b_: lora_linear_reference(x_, w_, None, a_, b_, s),
                            inputs, dy.float(), names=["y", "dx", "dA", "dB"], base=base))

    rows = [("frozen_linear", lambda x_: F.linear(x_, W), [])]
    rows.append(("eager_reference", lambda x_: lora_linear_reference(x_, W, None, A, B, s), [A, B]))
    if not args.skip_compile:
        compiled = torch.compile(lora_linear_reference)
        rows.append(("compiled_reference", lambda x_: compiled(x_, W, None, A, B, s), [A, B]))
    rows.append(("triton", lambda x_: lora_linear_triton(x_, W, None, A, B, s), [A, B]))
    rows.append(("addmm", lambda x_: lora_linear_addmm(x_, W, None, A, B, s), [A, B]))
    rows.append(("dispatch", lambda x_: lora_linear(x_, W, None, A, B, s), [A, B]))
    if DEV == "cuda" and torch.cuda.get_device_capability()[0] >= 9:  # the default there is the TMA GEMM; compare without
        rows.append(("triton_no_tma", lambda x_: lora_linear_triton(x_, W, None, A, B, s), [A, B],
                     {"LIGHTNING_PEFT_TMA": "0"}))
    try:
        m, params = peft_lora(K, N, dev, dt)
        rows.append(("hf_peft", m, params))
    except Exception as e:
        print(f"  hf_peft skipped: {type(e).__name__}: {e}"[:200], flush=True)
    measure("lora", M, K, N, rows, x, dy, args, results)
    from lightning_peft.kernels.limits import m_bucket
    from lightning_peft.kernels.path_tuning import tuned_paths

    picked = [c for k, c in tuned_paths().items() if (k.m_bucket, k.n, k.k, k.r) == (m_bucket(M), N, K, RANK)]
    print(f"  lora path tuner {M}x{K}->{N}: " + ("; ".join(f"{c.path} ({', '.join(f'{p} {t:.4f} ms' for p, t in c.times_ms.items())})"
                                                    for c in picked) or "not timed (the rule or a forced path)"), flush=True)


def run_adapter(M, d, args, results, checks):
    from lightning_peft.kernels import (
        adapter_bottleneck_reference,
        adapter_bottleneck_triton,
    )

    dev, dt = DEV, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    p = [(torch.randn(BOTTLENECK, d, device=dev, generator=g) / d**0.5),
         torch.randn(BOTTLENECK, device=dev, generator=g) * 0.1,
         (torch.randn(d, BOTTLENECK, device=dev, generator=g) / BOTTLENECK**0.5),
         torch.randn(d, device=dev, generator=g) * 0.1]
    wd, bd, wu, bu = (t.to(dt).requires_grad_() for t in p)
    x = torch.randn(M, d, device=dev, dtype=dt, generator=g).requires_grad_()
    dy = torch.randn(M, d, device=dev, dtype=dt, generator=g)

    checks.append(check(f"adapter {M}x{d} m={BOTTLENECK}", adapter_bottleneck_triton, adapter_bottleneck_reference,
                        [x.detach().float().requires_grad_()] + [t.detach().float().requires_grad_() for t in p],
                        dy.float()))

    params = [wd, bd, wu, bu]
    rows = [("residual_floor", lambda x_: x_ * 1.0, [])]
    rows.append(("eager_reference", lambda x_: adapter_bottleneck_reference(x_, wd, bd, wu, bu), params))
    if not args.skip_compile:
        compiled = torch.compile(adapter_bottleneck_reference)
        rows.append(("compiled_reference", lambda x_: compiled(x_, wd, bd, wu, bu), params))
    rows.append(("triton", lambda x_: adapter_bottleneck_triton(x_, wd, bd, wu, bu), params))
    measure("adapter", M, d, d, rows, x, dy, args, results)


def run_gemm(M, K, N, args, results, checks):
    """The bare GEMMs: our Triton GEMM (``lora._gemm`` without the rank-r epilogue) against cuBLAS, forward
    ``x·Wᵀ`` vs ``F.linear`` and dgrad ``dy·W`` vs ``dy @ W``; the ratio says in one number whether the fused
    path's GEMM can win (it needs ~0.97x of cuBLAS to meet the LoRA targets)."""
    from lightning_peft.kernels import lora

    dev, dt = DEV, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    W = (torch.randn(N, K, device=dev, generator=g) / K**0.5).to(dt)
    x = torch.randn(M, K, device=dev, generator=g).to(dt)
    dy = torch.randn(M, N, device=dev, generator=g).to(dt)
    ours_fwd = lambda: lora._gemm(x, W.t(), None, None, None, 1.0, dt)
    ours_dgrad = lambda: lora._gemm(dy, W, None, None, None, 1.0, dt)
    ok, parity = True, []
    for op, ours, ref in (("fwd", ours_fwd, lambda: F.linear(x, W)), ("dgrad", ours_dgrad, lambda: dy @ W)):
        exact = ref().double() if SMOKE else (x.double() @ W.double().t() if op == "fwd" else dy.double() @ W.double())
        e, e_ref = max_err(ours(), exact), max_err(ref(), exact)
        bound = 4 * e_ref + 2 * 2**-7 * exact.abs().max().item()
        ok &= bool(math.isfinite(e) and e <= bound)
        parity.append(dict(tensor=op, err=e, ref_bf16_err=e_ref, bound=bound))
    checks.append(dict(name=f"gemm {M}x{K}->{N}", passed=ok, tensors=parity))
    print(f"  check gemm {M}x{K}->{N}: {'PASS' if ok else 'FAIL'}", flush=True)
    tma = DEV == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    for op, cublas, ours in (("fwd", lambda: F.linear(x, W), ours_fwd), ("dgrad", lambda: dy @ W, ours_dgrad)):
        variants = [("cublas", cublas, {}), ("triton", ours, {})] + ([("triton_no_tma", ours, {"LIGHTNING_PEFT_TMA": "0"})] if tma else [])
        floor = None
        for name, fn, env in variants:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                t = time_fn(fn, args.rep)
            finally:
                for k, v in saved.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            floor = floor or t
            results.append(dict(kind="gemm", name=f"{op}_{name}", M=M, K=K, N=N, fwd_ms=round(t, 4),
                                ratio_fwd=round(t / floor, 3), tflops=round(2 * M * N * K / t / 1e9, 1)))
            print(f"  gemm    {M:6d} {K:5d}->{N:<6d} {op}_{name:14s} {t:8.4f} ms  x{t / floor:5.3f}  "
                  f"{2 * M * N * K / t / 1e9:7.1f} TFLOP/s", flush=True)


def time_fn(fn, rep):
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep)


def measure(kind, M, K, N, rows, x, dy, args, results):
    floor = None
    for name, step, params, *env in rows:
        if DEV == "cuda":
            torch.cuda.empty_cache()
        saved = {k: os.environ.get(k) for k in (env[0] if env else {})}
        os.environ.update(env[0] if env else {})
        try:
            t_fb, t_f, peak = bench(step, params, x, dy, args.rep)
        except Exception as e:
            print(f"  {kind} {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if floor is None:
            floor = dict(fwd_bwd_ms=t_fb, fwd_ms=t_f, peak_extra_MiB=peak)
        r = dict(kind=kind, name=name, M=M, K=K, N=N, fwd_ms=round(t_f, 4), fwd_bwd_ms=round(t_fb, 4),
                 peak_extra_MiB=round(peak, 1), ratio_fwd_bwd=round(t_fb / floor["fwd_bwd_ms"], 3),
                 ratio_fwd=round(t_f / floor["fwd_ms"], 3),
                 mem_ratio=round(peak / floor["peak_extra_MiB"], 3) if floor["peak_extra_MiB"] else None)
        target = TARGETS.get((kind, M, K, N))
        if name in TARGET_ROWS and target is not None:
            r["target_ratio"] = target
            r["meets_time_target"] = r["ratio_fwd_bwd"] <= target
            if kind == "lora":
                # the rank-r tensors x·Aᵀ and dh (M×r fp32) are allowed on top: 5%
                r["meets_memory_target"] = peak <= 1.05 * floor["peak_extra_MiB"]
        results.append(r)
        print(f"  {kind:7s} {M:6d} {K:5d}->{N:<6d} {name:19s} fwd+bwd {t_fb:8.4f} ms  x{r['ratio_fwd_bwd']:5.2f}   "
              f"fwd {t_f:7.4f} ms  x{r['ratio_fwd']:5.2f}   peak +{peak:8.1f} MiB"
              + (f"   target x{target:.2f}: {'met' if r['meets_time_target'] else 'MISSED'}" if "target_ratio" in r else ""),
              flush=True)


def autotuned_configs():
    from lightning_peft.kernels import bottleneck, lora, path_tuning

    out = {}
    for mod in (lora, bottleneck):
        for name in dir(mod):
            k = getattr(mod, name)
            if hasattr(k, "cache") and hasattr(k, "configs"):
                out[name] = {str(key): str(cfg) for key, cfg in k.cache.items()}
    out["lora_path"] = {str(tuple(key)): dict(path=c.path, times_ms=c.times_ms) for key, c in path_tuning.tuned_paths().items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--only", choices=["gemm", "lora", "adapter"], help="run one family")
    ap.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (slow to compile)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check the script itself on CPU (TRITON_INTERPRET=1, tiny shapes, meaningless times)")
    args = ap.parse_args()
    if args.cpu_smoke:
        global DEV, SMOKE, LORA_SHAPES, ADAPTER_SHAPES, TARGETS
        DEV, SMOKE, args.skip_compile = "cpu", True, True
        LORA_SHAPES, ADAPTER_SHAPES = [(80, 64, 48)], [(80, 64)]
        TARGETS = {("lora", 80, 64, 48): 1.10, ("adapter", 80, 64, 64): 2.5}
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
              "The kernels' correctness tests run on CPU: pytest tests/test_kernels_lora.py "
              "tests/test_kernels_bottleneck.py", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_kernels.py needs triton (pip install triton)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    env = dict(gpu=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke run, times meaningless)",
               torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    try:
        import peft

        env["peft"] = peft.__version__
    except Exception:
        env["peft"] = None
    print(json.dumps(env), flush=True)
    results, checks = [], []

    def save(partial):  # after every shape, so that a run cut short by a time limit leaves what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(dict(env=env, partial=partial, results=results, checks=checks,
                                                      autotuned=autotuned_configs()), indent=1))

    if args.only in (None, "gemm"):
        for M, K, N in LORA_SHAPES:
            run_gemm(M, K, N, args, results, checks)
            save(True)
    if args.only in (None, "lora"):
        for M, K, N in LORA_SHAPES:
            run_lora(M, K, N, args, results, checks)
            save(True)
    if args.only in (None, "adapter"):
        for M, d in ADAPTER_SHAPES:
            run_adapter(M, d, args, results, checks)
            save(True)
    print("\nsummary (ratios to the floor measured in the same run):")
    print(f"{'kind':8s}{'shape':>22s}  {'impl':19s}{'fwd+bwd':>9s}{'fwd':>8s}{'mem':>8s}  target")
    for r in results:
        shape = f"{r['M']}x{r['K']}->{r['N']}"
        tgt = ""
        if "target_ratio" in r:
            tgt = f"<= {r['target_ratio']:.2f}: {'met' if r['meets_time_target'] else 'MISSED'}"
            if "meets_memory_target" in r:
                tgt += f", memory {'met' if r['meets_memory_target'] else 'MISSED'}"
        mem = f"{r['mem_ratio']:.2f}" if r.get("mem_ratio") is not None else "-"
        fb = f"{r['ratio_fwd_bwd']:9.2f}" if "ratio_fwd_bwd" in r else f"{'-':>9s}"
        print(f"{r['kind']:8s}{shape:>22s}  {r['name']:19s}{fb}{r['ratio_fwd']:8.2f}{mem:>8s}  {tgt}")
    ok = all(c["passed"] for c in checks)
    print(f"correctness at bf16 tolerance: {'PASS' if ok else 'FAIL'}")
    if args.out:
        save(False)
        print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
