"""Compile every Triton kernel configuration for a GPU target without a GPU (ahead of time).

The CPU tests run the kernels through Triton's interpreter, which checks the arithmetic but not
that the kernels compile for a real GPU (dot shapes, layouts, shared memory, registers). This
script records the exact launches the launchers make at the benchmark shapes (on ``meta``
tensors, nothing is computed), then compiles each kernel with each of its autotune configs for
the target (default sm_90, H100; the TMA GEMM variant too for 16-bit dtypes on sm_90+) with the
same argument specialisations Triton applies at run
time (integers equal to 1 become constants, multiples of 16 get divisibility hints), using the
ptxas shipped with triton. It reports shared memory, registers and spills per config and exits
non-zero if a kernel fails to compile or no config of a kernel fits the target.

    python scripts/check_kernels_compile.py                # sm_90, all configs, bf16 and fp32
    python scripts/check_kernels_compile.py --arch 80 --dtypes bf16 --first-config-only
    python scripts/check_kernels_compile.py --arch 89 --dtypes bf16,fp32 --first-config-only \
        --ranks 8,16,64,128 --bottlenecks 64,128,256 --masters    # what the tests run, on Ada
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TT = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64"}


class Recorder:
    """Stands in for an autotuned kernel: records ``kernel[grid](*args, **kwargs)`` calls."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, self.kernel, args, kwargs))

        return launch


def record_launches(dtype: torch.dtype, tma: bool, ranks=(16,), bottlenecks=(64,), masters: bool = False) -> list:
    """The launches at the benchmark shapes (r=16: all three LoRA shapes; other ranks: 8192x4096->4096),
    the bottleneck adapter at 8192x4096 for each m; ``masters``: fp32 adapter weights on 16-bit x."""
    from lightning_peft.kernels import bottleneck, lora

    os.environ[lora.TMA_ENV_VAR] = "1" if tma else "0"
    log: list = []
    for mod, names in ((lora, ["_gemm_lora_kernel", "_gemm_lora_tma_kernel", "_skinny_kernel", "_dy_pass_kernel"]),
                       (bottleneck, ["_adapter_fwd_kernel", "_adapter_bwd_dz_kernel", "_adapter_bwd_cols_kernel"])):
        for n in names:
            kernel = getattr(mod, n)
            setattr(mod, n, Recorder(n, kernel.kernel if isinstance(kernel, Recorder) else kernel, log))
    meta = dict(device="meta", dtype=dtype)
    wmeta = dict(device="meta", dtype=torch.float32 if masters else dtype)
    shapes = [(r, M, K, N) for r in ranks
              for (M, K, N) in ([(8192, 4096, 4096), (16384, 2048, 2048), (8192, 4096, 14336)] if r == 16 else [(8192, 4096, 4096)])]
    for r, M, K, N in shapes:
        x = torch.empty(M, K, **meta, requires_grad=True)
        w = torch.empty(N, K, **meta)
        a = torch.empty(r, K, **wmeta, requires_grad=True)
        b = torch.empty(N, r, **wmeta, requires_grad=True)
        _, h = lora.fused_forward(x, None, w, None, a, b, 2.0)  # the ops' bodies: meta tensors reach the launchers
        lora.fused_backward(torch.empty(M, N, **meta), x, None, w, a, b, h, 2.0, None, [True, False, False, False, True, True])
    M, d = 8192, 4096
    for m in bottlenecks:
        params = [torch.empty(m, d, **wmeta), torch.empty(m, **wmeta), torch.empty(d, m, **wmeta), torch.empty(d, **wmeta)]
        for p in params:
            p.requires_grad_()
        x = torch.empty(M, d, **meta, requires_grad=True)
        _, z = bottleneck.bottleneck_forward(x, *params, None, "gelu", 1.0, True)  # the ops' bodies, as above
        bottleneck.bottleneck_backward(torch.empty(M, d, **meta), x, params[0], params[2], z, "gelu", 1.0, True,
                                       params[1].dtype, params[3].dtype, [True] * 5)
    if tma:  # the TMA variant only replaces the big GEMMs
        log = [entry for entry in log if entry[0] == "_gemm_lora_tma_kernel"]
    # one distinct launch per (kernel, specialisation)
    seen, unique = set(), []
    for name, kernel, args, kwargs in log:
        key = (name, tuple(_spec(a) for a in args), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in seen:
            seen.add(key)
            unique.append((name, kernel, args, kwargs))
    return unique


def _spec(v):
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(v, torch.Tensor):
        return TT[v.dtype]
    if isinstance(v, TensorDescriptor):
        return ("desc", TT[v.base.dtype], tuple(v.strides))
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return 1 if v == 1 else ("D" if v % 16 == 0 else "i")
    return type(v).__name__


def compile_one(kernel, args, kwargs, config, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    fn = kernel.fn
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    values.update(config.kwargs)
    if config.pre_hook is not None:  # e.g. sets the TMA descriptors' block shapes
        config.pre_hook(values)
    sig, consts, attrs = {}, {}, {}
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    for i, n in enumerate(names):
        v = values[n]
        if n in constexpr_names:
            sig[n] = "constexpr"
            consts[n] = v
        elif isinstance(v, TensorDescriptor):
            sig[n] = mangle_type(v)
        elif isinstance(v, torch.Tensor):
            sig[n] = TT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif isinstance(v, int):
            if v == 1:
                sig[n] = "constexpr"
                consts[n] = 1
            else:
                sig[n] = "i32" if abs(v) < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{n}={v!r}")
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def resource_usage(ck) -> tuple[int, int]:
    """(registers, spill bytes) from the cubin, via the cuobjdump shipped with triton."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spill = re.search(r"STACK:(\d+)", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100, 80 = A100)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    ap.add_argument("--first-config-only", action="store_true",
                    help="compile one config per kernel (quick): the one LIGHTNING_PEFT_AUTOTUNE=0 runs (the tests)")
    ap.add_argument("--ranks", default="16", help="comma-separated LoRA ranks, e.g. 8,16,64,128")
    ap.add_argument("--bottlenecks", default="64", help="comma-separated bottleneck sizes m, e.g. 64,128,256")
    ap.add_argument("--masters", action="store_true", help="also fp32 adapter weights on the 16-bit dtypes")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    bottlenecks = [int(m) for m in args.bottlenecks.split(",")]
    failures = 0
    for dname in args.dtypes.split(","):
        kw = dict(ranks=ranks, bottlenecks=bottlenecks)
        launches = record_launches(DTYPES[dname], tma=False, **kw)
        if args.masters and DTYPES[dname] != torch.float32:
            launches += record_launches(DTYPES[dname], tma=False, masters=True, **kw)
        if args.arch >= 90 and DTYPES[dname] != torch.float32:
            launches += record_launches(DTYPES[dname], tma=True, **kw)
        for name, kernel, largs, lkwargs in launches:
            configs = kernel.configs[:1] if args.first_config_only else kernel.configs
            fitting = 0
            for cfg in configs:
                t0 = time.time()
                try:
                    ck = compile_one(kernel, largs, lkwargs, cfg, args.arch)
                except Exception as e:
                    failures += 1
                    print(f"FAIL {dname} {name} {cfg}: {type(e).__name__}: {str(e)[:800]}", flush=True)
                    continue
                shared = ck.metadata.shared
                fits = shared <= MAX_SHARED.get(args.arch, 232448)
                fitting += fits
                regs, stack = resource_usage(ck)
                print(f"{'ok  ' if fits else 'BIG '} {dname} {name:26s} {cfg.kwargs!s:62s} w{cfg.num_warps} "
                      f"s{cfg.num_stages}  smem {shared / 1024:6.1f} KiB  regs {regs:3d}  stack {stack:4d}  "
                      f"{time.time() - t0:4.1f}s", flush=True)
            if fitting == 0:
                failures += 1
                print(f"FAIL {dname} {name}: no config fits sm_{args.arch}", flush=True)
    print("all kernels compile" if failures == 0 else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
