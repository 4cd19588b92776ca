"""Which LoRA linear formulation is the non-fused path: a training step of one layer on the CPU, in one run.

    python scripts/bench_lora_cpu.py                          # MiniLM-sized: 16 x 128 rows, 384 -> 384 / 1536, r=8, fp32
    python scripts/bench_lora_cpu.py --out docs/results/kernels/lora_cpu_formulations.json

Formulations (frozen base, x requires grad as inside an encoder, forward + backward of ``y``):

* ``frozen_base``: ``F.linear(x, W, b)`` alone (the floor);
* ``peft_eager``: HF PEFT's ``base(x) + F.linear(F.linear(drop(x), A), B) * s``;
* ``reference``: :func:`~lightning_peft.kernels.lora_linear_reference` (autograd, ``addmm`` accumulation);
* ``addmm_torch``: :func:`~lightning_peft.kernels.lora_addmm.lora_linear_addmm` with ``ops="torch"`` (the
  rank-r term first, the base GEMM accumulated onto it in place, saving x and x·Aᵀ only).

The steps are timed in turn and the medians reported (load changes on a shared machine hit all alike);
``saved_MiB`` is what autograd keeps for backward (parameters left out). ``--dtype bfloat16`` runs a 16-bit
base with fp32 adapter masters.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_llm_step.py

from bench_llm_step import interleaved_medians  # one timing loop for the benchmark scripts


def measure(rows: int, k: int, n: int, rank: int, dtype, steps: int) -> dict:
    """ms per step, ratio to the frozen base and saved MiB of each formulation at one shape."""
    import torch
    import torch.nn.functional as F

    from lightning_peft.kernels import lora_linear_reference
    from lightning_peft.kernels.lora_addmm import lora_linear_addmm
    from lightning_peft.utils.saved_memory import count_saved_bytes

    s = 2.0
    x0 = torch.randn(rows, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype)
    a = (torch.randn(rank, k) / k**0.5).requires_grad_()  # fp32 adapters (masters on a 16-bit base)
    bb = (torch.randn(n, rank) * 0.1).requires_grad_()
    dy = torch.randn(rows, n, dtype=dtype)

    def peft_eager(x):
        xa = x.to(a.dtype)  # PEFT casts the input to the adapter's dtype
        return F.linear(x, w, b) + (F.linear(F.linear(xa, a), bb) * s).to(x.dtype)

    forms = {
        "frozen_base": lambda x: F.linear(x, w, b),
        "peft_eager": peft_eager,
        "reference": lambda x: lora_linear_reference(x, w, b, a, bb, s),
        "addmm_torch": lambda x: lora_linear_addmm(x, w, b, a, bb, s, ops="torch"),
    }
    saved = {}
    for name, f in forms.items():
        x = x0.clone().requires_grad_()
        with count_saved_bytes(exclude=[w, b, a, bb]) as c:
            f(x * 1.0)  # a non-leaf activation, as inside a network (x·1 is not saved)
        saved[name] = c.bytes / 2**20

    def step(f):
        def run():
            f(x0.clone().requires_grad_()).backward(dy)
        return run

    medians = interleaved_medians({name: step(f) for name, f in forms.items()}, steps, warmup=3)
    floor = medians["frozen_base"]
    return {name: {"ms": round(medians[name] * 1e3, 3), "vs_frozen_base": round(medians[name] / floor, 3),
                   "saved_MiB": round(saved[name], 3)} for name in forms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16 * 128)
    parser.add_argument("--k", type=int, default=384)
    parser.add_argument("--n", default="384,1536", help="output widths, comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per formulation (interleaved; medians)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {f"{args.rows}x{args.k}->{n}": measure(args.rows, args.k, n, args.rank, getattr(torch, args.dtype), args.steps)
               for n in (int(v) for v in args.n.split(","))}
    report = {"rows": args.rows, "k": args.k, "rank": args.rank, "dtype": args.dtype, "steps": args.steps,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "results": results}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
