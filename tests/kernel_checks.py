"""Helpers for the Triton kernel tests: device choice and Liger-style error judgement."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _interpreter_runs_fp64_dots() -> bool:
    """Triton's CPU interpreter before 3.8 asserts on float64 ``tl.dot`` and benchmarks autotune configs through a
    GPU driver; the tests that need either are skipped there (a GPU run never takes those paths)."""
    try:
        import triton
    except ImportError:
        return False
    from packaging.version import InvalidVersion, Version

    try:
        return Version(triton.__version__).release[:2] >= (3, 8)
    except InvalidVersion:
        return True  # an unparsable (development) build: assume new


NEEDS_NEW_INTERPRETER = pytest.mark.skipif(
    not CUDA and not _interpreter_runs_fp64_dots(),
    reason="needs Triton >= 3.8 under the CPU interpreter (float64 dots, timing several autotune configs)",
)
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


def assert_like_reference(name: str, got: torch.Tensor, ref_lp: torch.Tensor, ref64: torch.Tensor,
                          factor: float = 4.0, floor_ulps: float = 8.0) -> None:
    """``got`` is no further from the float64 oracle than ``factor`` times the reference's own error
    in the same dtype, plus a floor of ``floor_ulps`` units of the dtype's epsilon (relative to the
    largest magnitude) so that a lucky exact reference does not make the bound zero."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert got.dtype == ref_lp.dtype, f"{name}: dtype {got.dtype} != {ref_lp.dtype}"
    g, r, o = got.double().cpu(), ref_lp.double().cpu(), ref64.double().cpu()
    assert torch.isfinite(g).all(), f"{name}: non-finite values"
    err = (g - o).abs().max().item()
    ref_err = (r - o).abs().max().item()
    scale = max(o.abs().max().item(), 1e-30)
    bound = factor * ref_err + floor_ulps * EPS[got.dtype] * scale
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs float64 exceeds {bound:.3e} "
        f"(reference's own {got.dtype} error {ref_err:.3e}, max |value| {scale:.3e})"
    )


def base64(m: dict) -> torch.Tensor:
    """``x·Wᵀ + bias`` in float64 on the CPU from LoRA masters ``m`` (the part of y without the rank-r term)."""
    x, w = m["x"].double().cpu(), m["weight"].double().cpu()
    b = m.get("bias")
    return torch.nn.functional.linear(x, w, None if b is None else b.double().cpu())


def assert_rank_r_like_reference(name: str, got: torch.Tensor, ref_lp: torch.Tensor, ref64: torch.Tensor,
                                 base: torch.Tensor, factor: float = 4.0, floor_ulps: float = 8.0) -> None:
    """The rank-r part ``y - x·Wᵀ`` (``base``: ``x·Wᵀ + bias`` in float64) judged alone.

    The errors are y's (the base cancels), but the floor comes from the rank-r part's own size, not
    y's: when the rank-r term is small next to ``x·Wᵀ`` (B·0.01 in the benchmarks), a floor of a few
    ulps of max|y| would pass a kernel that dropped or mis-scaled it.
    """
    g, r, o, b = (t.double().cpu() for t in (got, ref_lp, ref64, base))
    err = (g - o).abs().max().item()
    ref_err = (r - o).abs().max().item()
    size = max((o - b).abs().max().item(), 1e-30)
    bound = factor * ref_err + floor_ulps * EPS[got.dtype] * size
    assert err <= bound, (
        f"{name}: rank-r part y - x·Wᵀ is off by {err:.3e}, beyond {bound:.3e} (reference's own {got.dtype} "
        f"error {ref_err:.3e}, max |rank-r part| {size:.3e})"
    )


def leaves(tensors: dict, dtype, requires_grad: set, device=DEVICE) -> dict:
    """Fresh leaf copies of the float64 masters in ``dtype`` on ``device``."""
    out = {}
    for k, t in tensors.items():
        if t is None:
            out[k] = None
            continue
        out[k] = t.detach().to(device=device, dtype=dtype).requires_grad_(k in requires_grad)
    return out


def run_and_grads(fn, args: dict, dy: torch.Tensor, order: list[str], **kwargs):
    """Call ``fn(*args[order], **kwargs)``, backprop ``dy``; returns (y, {name: grad})."""
    y = fn(*[args[k] for k in order], **kwargs)
    y.backward(dy.to(device=y.device, dtype=y.dtype))
    return y.detach(), {k: t.grad for k, t in args.items() if t is not None and t.requires_grad}
