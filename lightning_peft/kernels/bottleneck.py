"""Fused bottleneck adapter in Triton: ``y = residual + s·(act(x·W_downᵀ + b_down)·W_upᵀ + b_up)``.

Layering as in :mod:`.lora`: ``@triton.jit`` kernels → launchers → the ``torch.library`` custom ops
``lightning_peft::bottleneck_fwd`` / ``bottleneck_bwd`` (fake functions for shapes, the forward op's
autograd), which ``torch.compile`` keeps in its graphs. Import lazily (this module imports triton).

Shapes: ``x``/``residual``/``y`` ``(M, d)`` (leading dims flattened), ``W_down`` ``(m, d)``,
``b_down`` ``(m,)``, ``W_up`` ``(d, m)``, ``b_up`` ``(d,)``, ``m <= 256`` (padded to a power of
two ``>= 16`` inside). ``z = x·W_downᵀ + b_down`` ``(M, m)``, ``a = act(z)``.

Forward, one kernel, one program per block of rows: ``z`` for the rows (reads x), then
``y = residual + s·(a·W_upᵀ + b_up)`` column block by column block (reads the residual — x itself
for a serial adapter, still in L2 — and writes y). Saved for backward: x and the small fp32 ``z``.

Backward, two kernels:

1. per row block, one read of dy: ``dz = s·(dy·W_up) ⊙ act'(z)`` ``(M, m)`` (fp32, small).
2. per column block (rows split into a few slices), reading dy and x once:
   ``dx = dz·W_down (+ dy when the residual is x)`` ``(M, d)``, and partial sums of
   ``dW_up = s·dyᵀ·a`` ``(d, m)``, ``dW_down = dzᵀ·x`` ``(m, d)``, ``db_up = s·Σ_rows dy`` ``(d,)``.

``db_down = Σ_rows dz`` ``(m,)`` and the partial sums are reduced with ``torch.sum``
(deterministic, no atomics). A separate residual gets ``dresidual = dy``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import (
    INTERPRET,
    autocast_cast,
    check_device,
    check_dtypes,
    device_guard,
    m_bucket,
    next_pow2,
    num_sms,
    precision_for,
    prep_operand,
    prune_configs,
)
from .limits import MAX_BOTTLENECK
from .reference import activation_fn, check_adapter_args, no_autocast

__all__ = ["MAX_BOTTLENECK", "adapter_bottleneck_triton", "autotuned_kernels", "bottleneck_backward", "bottleneck_bwd", "bottleneck_forward", "bottleneck_fwd"]


_ACT_IDS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # exact GELU
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:  # tanh GELU, tanh(u) = 2·sigmoid(2u) - 1
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (2.0 * tl.sigmoid(2.0 * u))
    elif ACT == 2:
        out = tl.where(z > 0, z, 0.0)
    else:
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """``act'(z)``."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        out = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 1:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 2:
        out = tl.where(z > 0, 1.0, 0.0)
    else:
        sg = tl.sigmoid(z)
        out = sg * (1.0 + z * (1.0 - sg))
    return out


def _fwd_configs(every: bool = False):
    if INTERPRET and not every:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_D": 64}, num_warps=4)]
    c = triton.Config
    return [c({"BLOCK_M": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2)] + [  # first: pinned, fits sm_80/89 (see _dz_configs)
        c({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm in (32, 64) for bd in (64, 128) for w in (4, 8) for s in (2, 3)
    ]


def _dz_configs(every: bool = False):  # the first config (here and in _cols_configs) is the small one LIGHTNING_PEFT_AUTOTUNE=0
    # pins (the tests): it fits every GPU from sm_80 at m=256 and in fp32 (scripts/check_kernels_compile.py)
    if INTERPRET and not every:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_D": 64}, num_warps=4)]
    c = triton.Config
    return [c({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bm, bd, w, st in [(32, 32, 4, 2), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3),
                                  (64, 128, 8, 3), (64, 64, 8, 4)]]


def _cols_configs(every: bool = False):
    # the register-heavy kernel (two (BLOCK_D, m) accumulators): these compile without spills
    # for m <= 64 on sm_90 (scripts/check_kernels_compile.py)
    if INTERPRET and not every:
        return [triton.Config({"BLOCK_M": 128, "BLOCK_D": 64}, num_warps=4)]
    c = triton.Config
    return [c({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bm, bd, w, st in [(16, 32, 4, 2), (32, 64, 4, 2), (32, 64, 8, 3), (32, 128, 8, 2), (64, 64, 8, 2),
                                  (64, 128, 8, 2), (16, 64, 4, 3)]]


#: Row slices of the split-reduction kernel are multiples of this, so that any tuned row block divides them.
_ROW_ALIGN = 128


@triton.autotune(configs=_fwd_configs(), key=["M_BUCKET", "D", "BLOCK_H", "HAS_RESIDUAL"],
                  prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _adapter_fwd_kernel(
    x_ptr, res_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr, z_ptr,
    M, D, H, scale,
    stride_xm, stride_xd, stride_rm, stride_rd, stride_wdh, stride_wdd, stride_wud, stride_wuh,
    stride_ym, stride_yd, stride_zm, stride_zh,
    M_BUCKET,  # autotune key only
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SAVE_Z: tl.constexpr, BLOCK_H: tl.constexpr,
    ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d0 = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    h_mask = offs_h < H
    rm = offs_m.to(tl.int64)

    # z = x·W_downᵀ + b_down for this block of rows
    z = tl.zeros((BLOCK_M, BLOCK_H), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        d_mask = offs_d < D
        rd = offs_d.to(tl.int64)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rd[None, :] * stride_xd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        wd = tl.load(wd_ptr + offs_h[None, :] * stride_wdh + rd[:, None] * stride_wdd,
                     mask=h_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_H) = W_downᵀ
        x = prep_operand(x, DT, ACC, LOW_PREC, UPCAST)
        wd = prep_operand(wd, DT, ACC, LOW_PREC, UPCAST)
        z = tl.dot(x, wd, z, input_precision=INPUT_PRECISION)
    if HAS_BD:
        z += tl.load(bd_ptr + offs_h, mask=h_mask, other=0.0).to(ACC)[None, :]
    if SAVE_Z:
        tl.store(z_ptr + rm[:, None] * stride_zm + offs_h[None, :] * stride_zh, z,
                 mask=m_mask[:, None] & h_mask[None, :])
    a = prep_operand(_act(z, ACT), DT, ACC, LOW_PREC, UPCAST)  # padded columns: act(0) = 0

    # y = residual + s·(a·W_upᵀ + b_up), one column block at a time
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        d_mask = offs_d < D
        rd = offs_d.to(tl.int64)
        wu = tl.load(wu_ptr + offs_h[:, None] * stride_wuh + rd[None, :] * stride_wud,
                     mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_H, BLOCK_D) = W_upᵀ
        wu = prep_operand(wu, DT, ACC, LOW_PREC, UPCAST)
        out = tl.dot(a, wu, input_precision=INPUT_PRECISION)
        if HAS_BU:
            out += tl.load(bu_ptr + rd, mask=d_mask, other=0.0).to(ACC)[None, :]
        mask = m_mask[:, None] & d_mask[None, :]
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + rm[:, None] * stride_rm + rd[None, :] * stride_rd, mask=mask, other=0.0)
        else:
            res = tl.load(x_ptr + rm[:, None] * stride_xm + rd[None, :] * stride_xd, mask=mask, other=0.0)
        y = res.to(ACC) + scale * out
        tl.store(y_ptr + rm[:, None] * stride_ym + rd[None, :] * stride_yd, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_dz_configs(), key=["M_BUCKET", "D", "BLOCK_H"],
                  prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _adapter_bwd_dz_kernel(
    dy_ptr, wu_ptr, z_ptr, dz_ptr,
    M, D, H, scale,
    stride_dym, stride_dyd, stride_wud, stride_wuh, stride_zm, stride_zh, stride_dzm, stride_dzh,
    M_BUCKET,
    ACT: tl.constexpr, BLOCK_H: tl.constexpr,
    ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dz = s·(dy·W_up) ⊙ act'(z)`` for one block of rows (one read of those rows of dy)."""
    DT: tl.constexpr = dy_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d0 = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    h_mask = offs_h < H
    rm = offs_m.to(tl.int64)
    da = tl.zeros((BLOCK_M, BLOCK_H), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        d_mask = offs_d < D
        rd = offs_d.to(tl.int64)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rd[None, :] * stride_dyd,
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        wu = tl.load(wu_ptr + rd[:, None] * stride_wud + offs_h[None, :] * stride_wuh,
                     mask=d_mask[:, None] & h_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_H)
        dy = prep_operand(dy, DT, ACC, LOW_PREC, UPCAST)
        wu = prep_operand(wu, DT, ACC, LOW_PREC, UPCAST)
        da = tl.dot(dy, wu, da, input_precision=INPUT_PRECISION)
    mask = m_mask[:, None] & h_mask[None, :]
    z = tl.load(z_ptr + rm[:, None] * stride_zm + offs_h[None, :] * stride_zh, mask=mask, other=0.0)
    dz = scale * da * _act_grad(z, ACT)
    tl.store(dz_ptr + rm[:, None] * stride_dzm + offs_h[None, :] * stride_dzh, dz, mask=mask)


@triton.autotune(configs=_cols_configs(), key=["M_BUCKET", "D", "BLOCK_H", "NEED_DX", "NEED_WU", "NEED_WD"],
                  prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _adapter_bwd_cols_kernel(
    dy_ptr, x_ptr, z_ptr, dz_ptr, wd_ptr, dx_ptr, dwu_part_ptr, dwd_part_ptr, dbu_part_ptr,
    M, D, H, ROWS_PER_SPLIT, scale,
    stride_dym, stride_dyd, stride_xm, stride_xd, stride_zm, stride_zh, stride_dzm, stride_dzh,
    stride_wdh, stride_wdd, stride_dxm, stride_dxd,
    stride_wup_s, stride_wup_d, stride_wup_h, stride_wdp_s, stride_wdp_h, stride_wdp_d, stride_bup_s,
    M_BUCKET,
    ACT: tl.constexpr, BLOCK_H: tl.constexpr, RESIDUAL_IS_X: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_WU: tl.constexpr, NEED_WD: tl.constexpr, NEED_BU: tl.constexpr,
    ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (c, s): column block c, row slice s. Writes dx for its tile and partial sums of
    ``s·dyᵀ·a``, ``dzᵀ·x`` and ``s·Σ dy`` for its columns over its rows."""
    DT: tl.constexpr = dy_ptr.dtype.element_ty
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    d_mask = offs_d < D
    h_mask = offs_h < H
    rd = offs_d.to(tl.int64)
    wd = tl.load(wd_ptr + offs_h[:, None] * stride_wdh + rd[None, :] * stride_wdd,
                 mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)
    wd = prep_operand(wd, DT, ACC, LOW_PREC, UPCAST)
    acc_wu = tl.zeros((BLOCK_D, BLOCK_H), dtype=ACC)
    acc_wd = tl.zeros((BLOCK_H, BLOCK_D), dtype=ACC)
    acc_bu = tl.zeros((BLOCK_D,), dtype=ACC)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(M, row_start + ROWS_PER_SPLIT)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        rm = offs_m.to(tl.int64)
        tile_mask = m_mask[:, None] & d_mask[None, :]
        hid_mask = m_mask[:, None] & h_mask[None, :]
        dy_raw = tl.load(dy_ptr + rm[:, None] * stride_dym + rd[None, :] * stride_dyd, mask=tile_mask, other=0.0)
        dy = prep_operand(dy_raw, DT, ACC, LOW_PREC, UPCAST)
        if NEED_DX or NEED_WD:
            dz = tl.load(dz_ptr + rm[:, None] * stride_dzm + offs_h[None, :] * stride_dzh, mask=hid_mask, other=0.0)
            dz = prep_operand(dz, DT, ACC, LOW_PREC, UPCAST)
        if NEED_DX:
            dx = tl.dot(dz, wd, input_precision=INPUT_PRECISION)
            if RESIDUAL_IS_X:
                dx += dy_raw.to(ACC)
            tl.store(dx_ptr + rm[:, None] * stride_dxm + rd[None, :] * stride_dxd,
                     dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_WD:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rd[None, :] * stride_xd, mask=tile_mask, other=0.0)
            x = prep_operand(x, DT, ACC, LOW_PREC, UPCAST)
            acc_wd = tl.dot(tl.trans(dz), x, acc_wd, input_precision=INPUT_PRECISION)
        if NEED_WU:
            z = tl.load(z_ptr + rm[:, None] * stride_zm + offs_h[None, :] * stride_zh, mask=hid_mask, other=0.0)
            a = prep_operand(_act(z, ACT), DT, ACC, LOW_PREC, UPCAST)
            acc_wu = tl.dot(tl.trans(dy), a, acc_wu, input_precision=INPUT_PRECISION)
        if NEED_BU:
            acc_bu += tl.sum(dy_raw.to(ACC), axis=0)
    ps = pid_s.to(tl.int64)
    if NEED_WU:
        tl.store(dwu_part_ptr + ps * stride_wup_s + rd[:, None] * stride_wup_d + offs_h[None, :] * stride_wup_h,
                 acc_wu * scale, mask=d_mask[:, None] & h_mask[None, :])
    if NEED_WD:
        tl.store(dwd_part_ptr + ps * stride_wdp_s + offs_h[:, None] * stride_wdp_h + rd[None, :] * stride_wdp_d,
                 acc_wd, mask=h_mask[:, None] & d_mask[None, :])
    if NEED_BU:
        tl.store(dbu_part_ptr + ps * stride_bup_s + rd, acc_bu * scale, mask=d_mask)


def autotuned_kernels() -> dict[str, tuple[triton.runtime.Autotuner, list[triton.Config]]]:
    """Each autotuned kernel of this module with every config a GPU tunes it over (under the interpreter the kernel
    itself holds one); run one config with :func:`~lightning_peft.kernels._triton_common.pinned_config`."""
    return {
        "fwd": (_adapter_fwd_kernel, _fwd_configs(every=True)),
        "bwd_dz": (_adapter_bwd_dz_kernel, _dz_configs(every=True)),
        "bwd_cols": (_adapter_bwd_cols_kernel, _cols_configs(every=True)),
    }


def bottleneck_forward(x: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None,
                       residual: Tensor | None, activation: str, scale: float, need_grad: bool) -> tuple[Tensor, Tensor]:
    """The forward kernel: ``(y, z)``, ``y`` ``(M, d)`` and ``z = x·W_downᵀ + b_down`` ``(M, m)`` fp32 (``(0, m)``
    unless ``need_grad``). 2-D inputs; ``residual`` ``None`` is the serial adapter (the residual is ``x``).

    The body of the op ``lightning_peft::bottleneck_fwd`` (:func:`bottleneck_fwd`, which has the autograd).
    """
    M, D = x.shape
    H = w_down.shape[0]
    prec = precision_for(x.dtype)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((M, D), device=x.device, dtype=out_dtype)
    z = torch.empty((M if need_grad else 0, H), device=x.device, dtype=prec.acc_torch)
    res = residual if residual is not None else x
    if M > 0 and D > 0:
        with device_guard(x), no_autocast(x):
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
            _adapter_fwd_kernel[grid](
                x, res, w_down, b_down if b_down is not None else x, w_up, b_up if b_up is not None else x,
                y, z if need_grad else y, M, D, H, float(scale),
                x.stride(0), x.stride(1), res.stride(0), res.stride(1), w_down.stride(0), w_down.stride(1),
                w_up.stride(0), w_up.stride(1), y.stride(0), y.stride(1),
                z.stride(0) if need_grad else 0, z.stride(1), m_bucket(M),
                ACT=_ACT_IDS[activation], HAS_BD=b_down is not None, HAS_BU=b_up is not None,
                HAS_RESIDUAL=residual is not None, SAVE_Z=need_grad, BLOCK_H=next_pow2(H),
                ACC=prec.acc, LOW_PREC=prec.low_prec, UPCAST=prec.upcast,
                INPUT_PRECISION=prec.input_precision,
            )
    return y, z


bottleneck_fwd = torch.library.custom_op("lightning_peft::bottleneck_fwd", bottleneck_forward, mutates_args=())


@bottleneck_fwd.register_fake
def _(x, w_down, b_down, w_up, b_up, residual, activation, scale, need_grad):
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    z = x.new_empty((x.shape[0] if need_grad else 0, w_down.shape[0]), dtype=precision_for(x.dtype).acc_torch)
    return x.new_empty(tuple(x.shape), dtype=out_dtype), z


#: The inputs of ``bottleneck_fwd`` whose gradients ``bottleneck_bwd`` gives (the residual's is ``dy`` itself).
_GRAD_INPUTS = ("x", "w_down", "b_down", "w_up", "b_up")


def bottleneck_backward(dy: Tensor, x: Tensor, w_down: Tensor, w_up: Tensor, z: Tensor, activation: str, scale: float,
                        residual_is_x: bool, b_down_dtype: torch.dtype, b_up_dtype: torch.dtype,
                        needs: list[bool]) -> list[Tensor]:
    """The backward kernels: the gradients of ``x, w_down, b_down, w_up, b_up`` flagged in ``needs``, in that order.

    ``dy`` ``(M, d)`` in x's dtype. ``dz = s·(dy·W_up) ⊙ act'(z)`` ``(M, m)``, then in one pass over dy and x
    ``dx = dz·W_down (+ dy when residual_is_x)`` ``(M, d)``, ``dW_up = s·dyᵀ·a`` ``(d, m)``, ``dW_down = dzᵀ·x``
    ``(m, d)``, ``db_up = s·Σ_rows dy`` ``(d,)`` (``b_up_dtype``), ``db_down = Σ_rows dz`` ``(m,)`` (``b_down_dtype``);
    weight gradients in the weights' dtypes. The body of the op ``lightning_peft::bottleneck_bwd``.
    """
    need_x, need_wd, need_bd, need_wu, need_bu = needs
    M, D = x.shape
    H = w_down.shape[0]
    s = float(scale)
    prec = precision_for(x.dtype)
    BLOCK_H = next_pow2(H)
    act = _ACT_IDS[activation]
    common = dict(ACC=prec.acc, LOW_PREC=prec.low_prec, UPCAST=prec.upcast, INPUT_PRECISION=prec.input_precision)
    out = {}
    with device_guard(dy), no_autocast(dy):
        dz = torch.empty((M, H), device=x.device, dtype=prec.acc_torch)
        if (need_x or need_wd or need_bd) and M > 0:
            _adapter_bwd_dz_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
                dy, w_up, z, dz, M, D, H, s,
                dy.stride(0), dy.stride(1), w_up.stride(0), w_up.stride(1), z.stride(0), z.stride(1),
                dz.stride(0), dz.stride(1), m_bucket(M),
                ACT=act, BLOCK_H=BLOCK_H, **common,
            )
        # rows split into slices (a multiple of _ROW_ALIGN rows each) so that about four
        # programs per SM run; the slices' partial weight gradients are summed below
        n_blocks = max(1, triton.cdiv(M, _ROW_ALIGN))
        want = max(1, min(n_blocks, triton.cdiv(4 * num_sms(x.device), max(1, triton.cdiv(D, 64)))))
        rows_per = triton.cdiv(n_blocks, want) * _ROW_ALIGN
        n_split = max(1, triton.cdiv(M, rows_per))
        acc_t = prec.acc_torch
        dx = torch.empty((M, D), device=x.device, dtype=x.dtype) if need_x else None
        dwu_p = torch.empty((n_split, D, H), device=x.device, dtype=acc_t) if need_wu else dz
        dwd_p = torch.empty((n_split, H, D), device=x.device, dtype=acc_t) if need_wd else dz
        dbu_p = torch.empty((n_split, D), device=x.device, dtype=acc_t) if need_bu else dz
        if (need_x or need_wu or need_wd or need_bu) and M > 0 and D > 0:
            dxt = dx if need_x else dy
            _adapter_bwd_cols_kernel[lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), n_split)](
                dy, x, z, dz, w_down, dxt, dwu_p, dwd_p, dbu_p,
                M, D, H, rows_per, s,
                dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), z.stride(0), z.stride(1),
                dz.stride(0), dz.stride(1), w_down.stride(0), w_down.stride(1), dxt.stride(0), dxt.stride(1),
                dwu_p.stride(0), dwu_p.stride(1), dwu_p.stride(-1), dwd_p.stride(0), dwd_p.stride(1),
                dwd_p.stride(-1), dbu_p.stride(0), m_bucket(M),
                ACT=act, BLOCK_H=BLOCK_H, RESIDUAL_IS_X=residual_is_x,
                NEED_DX=need_x, NEED_WU=need_wu, NEED_WD=need_wd, NEED_BU=need_bu, **common,
            )
        elif need_x:
            dx.zero_()
        if need_x:
            out["x"] = dx
        if need_wu:
            out["w_up"] = dwu_p.sum(0).to(w_up.dtype)
        if need_wd:
            out["w_down"] = dwd_p.sum(0).to(w_down.dtype)
        if need_bu:
            out["b_up"] = dbu_p.sum(0).to(b_up_dtype)
        if need_bd:
            out["b_down"] = dz.sum(0).to(b_down_dtype)
    return [out[k] for k, need in zip(_GRAD_INPUTS, needs) if need]


bottleneck_bwd = torch.library.custom_op("lightning_peft::bottleneck_bwd", bottleneck_backward, mutates_args=())


@bottleneck_bwd.register_fake
def _(dy, x, w_down, w_up, z, activation, scale, residual_is_x, b_down_dtype, b_up_dtype, needs):
    shapes = {"x": (x.shape, x.dtype), "w_down": (w_down.shape, w_down.dtype), "b_down": (w_down.shape[:1], b_down_dtype),
              "w_up": (w_up.shape, w_up.dtype), "b_up": (w_up.shape[:1], b_up_dtype)}
    return [dy.new_empty(tuple(shapes[k][0]), dtype=shapes[k][1]) for k, need in zip(_GRAD_INPUTS, needs) if need]


def _setup_context(ctx, inputs, output) -> None:
    x, w_down, b_down, w_up, b_up, residual, activation, scale, _ = inputs
    ctx.activation, ctx.scale, ctx.residual_is_x = activation, float(scale), residual is None
    ctx.bias_dtypes = tuple(x.dtype if b is None else b.dtype for b in (b_down, b_up))
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.save_for_backward(x, w_down, w_up, output[1])  # x and the small fp32 z
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dz):
    x, w_down, w_up, z = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    need_res = ctx.needs_input_grad[5] and not ctx.residual_is_x
    dres = dy.to(ctx.residual_dtype) if need_res else None
    grads = [None] * 5
    if any(needs):
        dy = dy.to(x.dtype)  # y was promoted to the residual's dtype; the branch ran in x's
        it = iter(bottleneck_bwd(dy, x, w_down, w_up, z, ctx.activation, ctx.scale, ctx.residual_is_x,
                                 *ctx.bias_dtypes, needs))
        grads = [next(it) if need else None for need in needs]
    return (*grads, dres, None, None, None)


torch.library.register_autograd("lightning_peft::bottleneck_fwd", _backward, setup_context=_setup_context)


def adapter_bottleneck_triton(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """:func:`~lightning_peft.kernels.reference.adapter_bottleneck_reference` computed by Triton kernels.

    Runs on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``. Checks the activation and shapes
    (ValueError), dtypes and devices, and ``m <= 256``. Under ``torch.autocast`` the projections
    run in the autocast dtype and the residual add in the residual's dtype, as in eager PyTorch
    (``y`` has the promoted dtype of the residual and the branch). The weights and biases may be
    fp32 masters on 16-bit activations: x, the residual and y stay 16-bit, the weights' operands are
    rounded to x's dtype inside the kernels, and their gradients come back in fp32.
    """
    activation_fn(activation)  # ValueError listing the valid names
    check_adapter_args(x, w_down, b_down, w_up, b_up, residual)
    m = w_down.shape[0]
    if m > MAX_BOTTLENECK:
        raise ValueError(f"bottleneck size m={m} is larger than the Triton kernels' maximum {MAX_BOTTLENECK}; "
                         "use adapter_bottleneck_reference (adapter_bottleneck falls back to it by itself)")
    check_device(x)
    if torch.is_autocast_enabled(x.device.type):
        # as eager PyTorch under autocast: the projections run in the autocast dtype, the residual
        # add in the residual's own dtype (an fp32 residual stream stays fp32)
        residual = x if residual is None else residual
        x, w_down, b_down, w_up, b_up = autocast_cast(x.device.type, x, w_down, b_down, w_up, b_up)
    check_dtypes({"x": x, "w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up}, x.device,
                 masters=("w_down", "b_down", "w_up", "b_up"))
    if residual is not None:
        check_dtypes({"residual": residual}, x.device)  # any supported dtype; y takes the promoted one
    d = w_down.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)
    r2 = residual.reshape(-1, d) if residual is not None else None
    tensors = (x2, w_down, b_down, w_up, b_up)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, _ = bottleneck_fwd(x2, w_down, b_down, w_up, b_up, r2, activation, float(scale), need_grad)
    return y.reshape(*lead, d)
