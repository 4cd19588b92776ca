"""Fused LoRA linear in Triton: ``y = x·Wᵀ + bias + s·(x̃·Aᵀ)·Bᵀ`` forward and backward.

Layering (as in Liger-Kernel): ``@triton.jit`` kernels → launchers that check, allocate and
launch → ``torch.library`` custom ops (``lightning_peft::lora_fused_fwd`` / ``lora_fused_bwd``, and the
skinny ``lora_skinny`` / ``lora_dy_pass`` of the cuBLAS-backed path) with fake (shape) functions and
the forward op's autograd, so ``torch.compile`` keeps them in its graphs. Import lazily (this module
imports triton).

Shapes: ``x`` ``(M, K)`` (leading dims flattened), ``W`` ``(N, K)``, ``bias`` ``(N,)``,
``A`` ``(r, K)``, ``B`` ``(N, r)``, ``s`` a float; ``x̃ = drop(x)`` (``x̃ = x`` without dropout).

Forward, two kernels:

1. ``h = x̃·Aᵀ`` ``(M, r)``: a skinny kernel, one read of x̃ (fp32 result, kept for backward).
2. ``y = x·Wᵀ + bias + s·h·Bᵀ``: the base GEMM with the rank-r term in its epilogue
   (``acc += s·h_tile·B_tileᵀ`` before the single store), so no extra full-size pass.

Backward, saved tensors x (x̃ too with dropout) and h only:

3. one pass over dy gives both ``dh = s·dy·B`` ``(M, r)`` and ``dB = s·dyᵀ·h`` ``(N, r)``
   (deterministic partial sums, reduced with ``torch.sum``).
4. ``dx = dy·W + dh·A`` ``(M, K)``: the dx GEMM with ``dh·A`` in its epilogue (the same kernel
   as 2). With dropout the branch input gets its own gradient ``dx̃ = dh·A`` and torch's dropout
   backward applies the mask.
5. ``dA = dhᵀ·x̃`` ``(r, K)``: the skinny kernel again, one read of x̃.

When the base is trainable, ``dW = dyᵀ·x`` ``(N, K)`` and ``dbias = Σ_rows dy`` ``(N,)`` come
from ``torch.mm`` / ``sum`` (only if they require grad). Ranks are padded to a power of two
``>= 16`` inside the kernels (``r <= 128``); all offsets into the large tensors are int64.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
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
from .limits import MAX_LORA_RANK
from .reference import check_lora_args, no_autocast

__all__ = ["autotuned_kernels", "fused_backward", "fused_forward", "lora_dy_pass", "lora_fused_bwd", "lora_fused_fwd", "lora_linear_triton", "lora_skinny"]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


def _gemm_configs(every: bool = False):
    if INTERPRET and not every:  # one config: autotune with several fails in the interpreter; big blocks are fast there
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4)]
    c = triton.Config
    return [
        # first: the config LIGHTNING_PEFT_AUTOTUNE=0 pins (the tests), small enough for every GPU from sm_80
        # (99 KiB of shared memory on sm_86/89) at r=128 and in fp32 (scripts/check_kernels_compile.py)
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=2, num_warps=4),
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        c({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
    ]


#: Row slices of the split-reduction kernels are multiples of this, so that any tuned row block divides them.
_ROW_ALIGN = 128


def _skinny_configs(every: bool = False):  # the first config of each list is the small one LIGHTNING_PEFT_AUTOTUNE=0 pins
    if INTERPRET and not every:
        return [triton.Config({"BLOCK_I": 64, "BLOCK_L": 128}, num_warps=4)]
    c = triton.Config
    return [c({"BLOCK_I": bi, "BLOCK_L": bl}, num_warps=w, num_stages=st)
            for bi, bl, w, st in [(32, 32, 4, 2), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3),
                                  (128, 64, 8, 3), (32, 64, 4, 4)]]


def _dy_configs(every: bool = False):
    if INTERPRET and not every:
        return [triton.Config({"BLOCK_M": 128}, num_warps=4)]
    c = triton.Config
    return [c({"BLOCK_M": bm}, num_warps=w, num_stages=st)
            for bm, w, st in [(16, 4, 2), (32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2), (32, 8, 4)]]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles (programs sharing a B column block run together, for L2)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _lora_epilogue(
    acc, pid_m, pid_n, M, N, R, lo_ptr, up_ptr, bias_ptr, c_ptr,
    stride_lm, stride_lr, stride_ur, stride_un, stride_cm, stride_cn, scale,
    DT: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``acc += scale·LO_tile·UP_tile (+ bias)``, then the one store of the output tile."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        lo = tl.load(lo_ptr + rm[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        up = tl.load(up_ptr + offs_r[:, None] * stride_ur + rn[None, :] * stride_un,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        # scale folded into LO, and the product accumulated into acc itself: a second
        # (BLOCK_M, BLOCK_N) accumulator would double the register footprint and spill
        lo = prep_operand(lo * scale, DT, ACC, LOW_PREC, UPCAST)
        up = prep_operand(up, DT, ACC, LOW_PREC, UPCAST)
        acc = tl.dot(lo, up, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(ACC)
        acc += bias[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "stride_bk", "HAS_LORA", "BLOCK_R"],
                  prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _gemm_lora_kernel(
    a_ptr, b_ptr, lo_ptr, up_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_ur, stride_un,
    stride_cm, stride_cn,
    scale,
    M_BUCKET,  # autotune key only: a power-of-two bucket of M, so new batch sizes do not re-tune
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``C = A·B + scale·LO·UP (+ bias)``: a GEMM with the rank-r product in its epilogue.

    A ``(M, K)``, B ``(K, N)``, LO ``(M, R)`` (fp32), UP ``(R, N)``, all by strides, so the same
    kernel is the forward (A=x, B=Wᵀ, LO=h, UP=Bᵀ) and the dx GEMM (A=dy, B=W, LO=dh, UP=A).
    """
    DT: tl.constexpr = a_ptr.dtype.element_ty
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    _lora_epilogue(acc, pid_m, pid_n, M, N, R, lo_ptr, up_ptr, bias_ptr, c_ptr,
                   stride_lm, stride_lr, stride_ur, stride_un, stride_cm, stride_cn, scale,
                   DT, HAS_LORA, HAS_BIAS, BLOCK_R, ACC, LOW_PREC, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)


def _set_tma_blocks(nargs):
    """Autotune pre-hook: the TMA descriptors' boxes follow the config's block sizes."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_KMAJOR"] else [bk, bn]


def _tma_configs(every: bool = False):
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_tma_blocks)
            for c in _gemm_configs(every)]


@triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K", "B_KMAJOR", "HAS_LORA", "BLOCK_R"],
                  prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _gemm_lora_tma_kernel(
    a_desc, b_desc, lo_ptr, up_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    stride_lm, stride_lr, stride_ur, stride_un,
    stride_cm, stride_cn,
    scale,
    M_BUCKET,  # autotune key only
    B_KMAJOR: tl.constexpr,  # B is given as its transpose (N, K) (the forward's W), else as (K, N)
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """:func:`_gemm_lora_kernel` with A and B read through TMA descriptors (Hopper and newer).

    The descriptors zero-fill out-of-bounds boxes, so the main loop has no masks; the epilogue is
    the same. Used for 16-bit inputs whose rows are 16-byte aligned.
    """
    DT: tl.constexpr = a_desc.dtype
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(tl.cdiv(K, BLOCK_K)):
        off_k = k * BLOCK_K
        a = a_desc.load([off_m, off_k])
        if B_KMAJOR:
            b = b_desc.load([off_n, off_k]).T
        else:
            b = b_desc.load([off_k, off_n])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    _lora_epilogue(acc, pid_m, pid_n, M, N, R, lo_ptr, up_ptr, bias_ptr, c_ptr,
                   stride_lm, stride_lr, stride_ur, stride_un, stride_cm, stride_cn, scale,
                   DT, HAS_LORA, HAS_BIAS, BLOCK_R, ACC, LOW_PREC, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N)


@triton.autotune(configs=_skinny_configs(), key=["I_BUCKET", "L_BUCKET", "stride_pl", "BLOCK_R"],
                  prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _skinny_kernel(
    p_ptr, q_ptr, out_ptr,
    I, L, R, L_PER_SPLIT,
    stride_pi, stride_pl, stride_ql, stride_qr, stride_os, stride_oi, stride_or,
    I_BUCKET, L_BUCKET,  # autotune key only: M is I (for h) or L (for dA); buckets, so new lengths do not re-tune
    ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``OUT[s] = P[:, Ls]·Q[Ls, :]`` for the s-th slice ``Ls`` of the long axis L (R is small).

    ``h = x̃·Aᵀ`` is P=x̃ ``(M, K)``, Q=Aᵀ, one slice; ``dAᵀ = x̃ᵀ·dh`` is P=x̃ᵀ ``(K, M)``, Q=dh,
    split along M into partial sums.
    """
    DT: tl.constexpr = p_ptr.dtype.element_ty
    pid_i = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_r = tl.arange(0, BLOCK_R)
    i_mask = offs_i < I
    r_mask = offs_r < R
    ri = offs_i.to(tl.int64)
    l_start = pid_s * L_PER_SPLIT
    l_end = tl.minimum(L, l_start + L_PER_SPLIT)
    acc = tl.zeros((BLOCK_I, BLOCK_R), dtype=ACC)
    for l0 in range(l_start, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < l_end
        rl = offs_l.to(tl.int64)
        p = tl.load(p_ptr + ri[:, None] * stride_pi + rl[None, :] * stride_pl,
                    mask=i_mask[:, None] & l_mask[None, :], other=0.0)
        q = tl.load(q_ptr + rl[:, None] * stride_ql + offs_r[None, :] * stride_qr,
                    mask=l_mask[:, None] & r_mask[None, :], other=0.0)
        p = prep_operand(p, DT, ACC, LOW_PREC, UPCAST)
        q = prep_operand(q, DT, ACC, LOW_PREC, UPCAST)
        acc = tl.dot(p, q, acc, input_precision=INPUT_PRECISION)
    o_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + ri[:, None] * stride_oi + offs_r[None, :] * stride_or
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & r_mask[None, :])


@triton.autotune(configs=_dy_configs(), key=["M_BUCKET", "N", "BLOCK_N", "BLOCK_R"],
                  prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _dy_pass_kernel(
    dy_ptr, h_ptr, b_ptr, dh_part_ptr, db_part_ptr,
    M, N, R, ROWS_PER_SPLIT, scale,
    stride_dym, stride_dyn, stride_hm, stride_hr, stride_bn, stride_br,
    stride_dhp_s, stride_dhp_m, stride_dhp_r, stride_dbp_s, stride_dbp_n, stride_dbp_r,
    M_BUCKET,  # autotune key only
    ACC: tl.constexpr, LOW_PREC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One read of dy for both LoRA gradients that need it.

    Program (n, s) takes the column block n of dy and the row slice s and writes
    ``dh_part[n] = s·dy[rows, cols_n]·B[cols_n]`` and ``dB_part[s] = s·dy[rows_s, cols_n]ᵀ·h[rows_s]``;
    the launcher sums the partials (deterministic, no atomics).
    """
    DT: tl.constexpr = dy_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < N
    r_mask = offs_r < R
    rn = offs_n.to(tl.int64)
    b = tl.load(b_ptr + rn[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=n_mask[:, None] & r_mask[None, :], other=0.0)
    b = prep_operand(b, DT, ACC, LOW_PREC, UPCAST)
    db_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(M, row_start + ROWS_PER_SPLIT)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        rm = offs_m.to(tl.int64)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        h = tl.load(h_ptr + rm[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        dy = prep_operand(dy, DT, ACC, LOW_PREC, UPCAST)
        h = prep_operand(h, DT, ACC, LOW_PREC, UPCAST)
        dh = tl.dot(dy, b, input_precision=INPUT_PRECISION) * scale
        tl.store(dh_part_ptr + pid_n.to(tl.int64) * stride_dhp_s + rm[:, None] * stride_dhp_m
                 + offs_r[None, :] * stride_dhp_r,
                 dh.to(dh_part_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])
        db_acc = tl.dot(tl.trans(dy), h, db_acc, input_precision=INPUT_PRECISION)
    tl.store(db_part_ptr + pid_s.to(tl.int64) * stride_dbp_s + rn[:, None] * stride_dbp_n
             + offs_r[None, :] * stride_dbp_r,
             (db_acc * scale).to(db_part_ptr.dtype.element_ty), mask=n_mask[:, None] & r_mask[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


TMA_ENV_VAR = "LIGHTNING_PEFT_TMA"


def autotuned_kernels() -> dict[str, tuple[triton.runtime.Autotuner, list[triton.Config]]]:
    """Each autotuned kernel of this module with every config a GPU tunes it over (under the interpreter the kernel
    itself holds one); run one config with :func:`~lightning_peft.kernels._triton_common.pinned_config`."""
    return {
        "gemm": (_gemm_lora_kernel, _gemm_configs(every=True)),
        "gemm_tma": (_gemm_lora_tma_kernel, _tma_configs(every=True)),
        "skinny": (_skinny_kernel, _skinny_configs(every=True)),
        "dy_pass": (_dy_pass_kernel, _dy_configs(every=True)),
    }


def _tma_wanted(t: Tensor) -> bool:
    """``LIGHTNING_PEFT_TMA``: ``0`` never, ``1`` whenever the layout allows (the interpreter too);
    unset: on CUDA devices of compute capability 9.0 and newer."""
    mode = os.environ.get(TMA_ENV_VAR, "").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    if mode in ("1", "true", "on", "yes"):
        return True
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _tma_ok(t: Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can read: last dim contiguous, 16-byte aligned base and rows."""
    return (
        t.dtype in (torch.float16, torch.bfloat16)
        and t.stride(1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        and min(t.shape) > 0
    )


def _gemm(a: Tensor, b_t: Tensor, lo: Tensor | None, up_t: Tensor | None, bias: Tensor | None,
          scale: float, out_dtype: torch.dtype) -> Tensor:
    """``a·b_t + scale·lo·up_t + bias``; ``b_t`` ``(K, N)`` and ``up_t`` ``(R, N)`` may be views."""
    M, K = a.shape
    N = b_t.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        c.zero_()
        if bias is not None:
            c += bias
        if lo is not None:
            c.addmm_(lo.to(out_dtype), up_t.to(out_dtype), alpha=scale)
        return c
    prec = precision_for(a.dtype)
    has_lora = lo is not None
    R = lo.shape[1] if has_lora else 0
    dummy = c
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    epilogue_args = (
        lo if has_lora else dummy, up_t if has_lora else dummy, bias if bias is not None else dummy, c,
        M, N, K, R,
    )
    epilogue_strides = (
        lo.stride(0) if has_lora else 0, lo.stride(1) if has_lora else 0,
        up_t.stride(0) if has_lora else 0, up_t.stride(1) if has_lora else 0,
        c.stride(0), c.stride(1),
        float(scale),
        m_bucket(M),
    )
    meta = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, BLOCK_R=next_pow2(R) if has_lora else 16,
                ACC=prec.acc, LOW_PREC=prec.low_prec, UPCAST=prec.upcast, INPUT_PRECISION=prec.input_precision)
    b_kmajor = b_t.stride(0) == 1  # b_t is the transpose of a row-major (N, K) tensor (the forward's W)
    b_rows = b_t.t() if b_kmajor else b_t
    if _tma_wanted(a) and _tma_ok(a) and _tma_ok(b_rows):
        from triton.tools.tensor_descriptor import TensorDescriptor

        # block shapes are placeholders: the autotune pre-hook sets them per config
        a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [16, 16])
        b_desc = TensorDescriptor(b_rows, list(b_rows.shape), list(b_rows.stride()), [16, 16])
        _gemm_lora_tma_kernel[grid](a_desc, b_desc, *epilogue_args, *epilogue_strides, B_KMAJOR=b_kmajor, **meta)
    else:
        _gemm_lora_kernel[grid](
            a, b_t, *epilogue_args[:4],
            M, N, K, R,
            a.stride(0), a.stride(1), b_t.stride(0), b_t.stride(1),
            *epilogue_strides,
            **meta,
        )
    return c


def _split_rows(n_rows: int, n_cols_programs: int, device: torch.device) -> tuple[int, int]:
    """(rows per slice, slices) for a reduction over ``n_rows`` split across programs: about four
    programs per SM in all, slices a multiple of ``_ROW_ALIGN`` rows."""
    n_blocks = max(1, triton.cdiv(n_rows, _ROW_ALIGN))
    want = max(1, min(n_blocks, triton.cdiv(4 * num_sms(device), max(1, n_cols_programs))))
    rows_per = triton.cdiv(n_blocks, want) * _ROW_ALIGN
    return rows_per, max(1, triton.cdiv(n_rows, rows_per))


def _skinny(p: Tensor, q: Tensor, split: bool = False) -> Tensor:
    """``p·q`` for a long-by-small ``q`` ``(L, R)``: returns ``(I, R)`` in the accumulation dtype.

    ``split`` divides the long axis L across programs (partial sums, then ``sum``): for
    ``dAᵀ = x̃ᵀ·dh``, whose I = K alone gives too few programs.
    """
    I, L = p.shape
    R = q.shape[1]
    prec = precision_for(p.dtype)
    if split:
        l_per, n_split = _split_rows(L, triton.cdiv(I, 64), p.device)
    else:
        l_per, n_split = max(L, 1), 1
    out = torch.empty((n_split, I, R), device=p.device, dtype=prec.acc_torch)
    if I == 0 or R == 0:
        return out.sum(0)
    if L == 0:
        return out.zero_().sum(0)
    grid = lambda meta: (triton.cdiv(I, meta["BLOCK_I"]), n_split)
    _skinny_kernel[grid](
        p, q, out, I, L, R, l_per,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1), out.stride(2),
        m_bucket(I), m_bucket(L),
        ACC=prec.acc, LOW_PREC=prec.low_prec, UPCAST=prec.upcast, INPUT_PRECISION=prec.input_precision,
        BLOCK_R=next_pow2(R),
    )
    return out[0] if n_split == 1 else out.sum(0)


def _dy_pass(dy: Tensor, h: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(dh, dB) = (s·dy·B, s·dyᵀ·h)`` from one read of dy, both in the accumulation dtype."""
    M, N = dy.shape
    R = lora_b.shape[1]
    prec = precision_for(dy.dtype)
    BLOCK_R = next_pow2(R)
    # BLOCK_N is fixed (it sets the number of dh partial sums); the row block is tuned
    BLOCK_N = 64 if INTERPRET else (256 if BLOCK_R <= 32 else 128)
    n_n = triton.cdiv(N, BLOCK_N)
    rows_per, n_split = _split_rows(M, n_n, dy.device)
    dh_part = torch.empty((n_n, M, R), device=dy.device, dtype=prec.acc_torch)
    db_part = torch.empty((n_split, N, R), device=dy.device, dtype=prec.acc_torch)
    if M == 0 or N == 0:
        return dh_part.zero_().sum(0), db_part.zero_().sum(0)
    _dy_pass_kernel[(n_n, n_split)](
        dy, h, lora_b, dh_part, db_part,
        M, N, R, rows_per, float(scale),
        dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1),
        dh_part.stride(0), dh_part.stride(1), dh_part.stride(2),
        db_part.stride(0), db_part.stride(1), db_part.stride(2),
        m_bucket(M),
        ACC=prec.acc, LOW_PREC=prec.low_prec, UPCAST=prec.upcast, INPUT_PRECISION=prec.input_precision,
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
    )
    dh = dh_part[0] if n_n == 1 else dh_part.sum(0)
    db = db_part[0] if n_split == 1 else db_part.sum(0)
    return dh, db


# --------------------------------------------------------------------------------------------
# custom ops (torch.compile keeps them in its graphs) and their autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("lightning_peft::lora_skinny", mutates_args=())
def lora_skinny(p: Tensor, q: Tensor, split: bool = False) -> Tensor:
    """:func:`_skinny` as an op: ``p·q`` ``(I, R)`` in fp32 (float64 for float64) for ``p`` ``(I, L)``, ``q`` ``(L, R)``."""
    with device_guard(p), no_autocast(p):
        return _skinny(p, q, split)


@lora_skinny.register_fake
def _(p, q, split=False):
    return p.new_empty((p.shape[0], q.shape[1]), dtype=precision_for(p.dtype).acc_torch)


@torch.library.custom_op("lightning_peft::lora_dy_pass", mutates_args=())
def lora_dy_pass(dy: Tensor, h: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`_dy_pass` as an op: ``(dh, dB) = (s·dy·B, s·dyᵀ·h)`` ``((M, r), (N, r))`` in fp32, one read of dy."""
    with device_guard(dy), no_autocast(dy):
        return _dy_pass(dy, h, lora_b, scale)


@lora_dy_pass.register_fake
def _(dy, h, lora_b, scale):
    acc = precision_for(dy.dtype).acc_torch
    return dy.new_empty((dy.shape[0], lora_b.shape[1]), dtype=acc), dy.new_empty(tuple(lora_b.shape), dtype=acc)


def fused_forward(x: Tensor, xd: Tensor | None, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                  lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Forward kernels 1-2: ``(y, h)`` with ``h = x̃·Aᵀ`` ``(M, r)`` fp32 and ``y = x·Wᵀ + bias + s·h·Bᵀ`` ``(M, N)``.

    2-D inputs; ``xd`` is the dropped-out branch input or ``None`` (then the branch reads ``x``). The body of
    the op ``lightning_peft::lora_fused_fwd`` (:func:`lora_fused_fwd`, which has the autograd).
    """
    with device_guard(x), no_autocast(x):
        h = _skinny(x if xd is None else xd, lora_a.t())
        return _gemm(x, weight.t(), h, lora_b.t(), bias, scale, x.dtype), h


lora_fused_fwd = torch.library.custom_op("lightning_peft::lora_fused_fwd", fused_forward, mutates_args=())


@lora_fused_fwd.register_fake
def _(x, xd, weight, bias, lora_a, lora_b, scale):
    acc = precision_for(x.dtype).acc_torch
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]), dtype=acc)


#: The inputs of ``lora_fused_fwd`` that have gradients, in order; ``lora_fused_bwd`` returns those asked for.
_GRAD_INPUTS = ("x", "xd", "weight", "bias", "lora_a", "lora_b")


def fused_backward(dy: Tensor, x: Tensor, xd: Tensor | None, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                   h: Tensor, scale: float, bias_dtype: torch.dtype | None, needs: list[bool]) -> list[Tensor]:
    """Backward kernels 3-5: the gradients of ``x, xd, weight, bias, lora_a, lora_b`` flagged in ``needs``, in that order.

    ``dh, dB`` from one pass over dy; ``dA = dhᵀ·x̃`` ``(r, K)``; ``dx = dy·W + dh·A`` ``(M, K)`` (with dropout
    ``dx = dy·W`` and ``dx̃ = dh·A``); ``dW = dyᵀ·x`` ``(N, K)``; ``dbias = Σ_rows dy`` ``(N,)`` in ``bias_dtype``.
    Adapter gradients take the dtype of ``lora_a`` / ``lora_b`` (fp32 masters: fp32 sums, never 16-bit ones).
    The body of the op ``lightning_peft::lora_fused_bwd`` (:func:`lora_fused_bwd`).
    """
    need_x, need_xd, need_w, need_bias, need_a, need_b = needs
    out = {}
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    branch = x if xd is None else xd
    with device_guard(dy), no_autocast(dy):
        if need_a or need_b or need_x or need_xd:
            dh, db = _dy_pass(dy, h, lora_b, scale)  # dh = s·dy·B, dB = s·dyᵀ·h
            if need_b:
                out["lora_b"] = db.to(lora_b.dtype)
        if need_a:  # dA = (x̃ᵀ·dh)ᵀ; before dx so its partials never coexist with dx
            out["lora_a"] = _skinny(branch.t(), dh, split=True).t().to(lora_a.dtype).contiguous()
        if need_x:  # dx = dy·W + dh·A, rank-r term in the GEMM epilogue (without it under dropout)
            dx = _gemm(dy, weight, dh, lora_a, None, 1.0, x.dtype) if xd is None else _gemm(dy, weight, None, None, None, 1.0, x.dtype)
            out["x"] = dx
        if need_xd:
            out["xd"] = torch.mm(dh.to(x.dtype), lora_a.to(x.dtype))  # torch's dropout backward applies the mask
        if need_w:
            out["weight"] = torch.mm(dy.t(), x)
        if need_bias:
            out["bias"] = dy.sum(0, dtype=bias_dtype)
    return [out[k] for k, need in zip(_GRAD_INPUTS, needs) if need]


lora_fused_bwd = torch.library.custom_op("lightning_peft::lora_fused_bwd", fused_backward, mutates_args=())


@lora_fused_bwd.register_fake
def _(dy, x, xd, weight, lora_a, lora_b, h, scale, bias_dtype, needs):
    shapes = {"x": (x.shape, x.dtype), "xd": (x.shape, x.dtype), "weight": (weight.shape, x.dtype),
              "bias": ((weight.shape[0],), bias_dtype), "lora_a": (lora_a.shape, lora_a.dtype),
              "lora_b": (lora_b.shape, lora_b.dtype)}
    return [dy.new_empty(tuple(shapes[k][0]), dtype=shapes[k][1]) for k, need in zip(_GRAD_INPUTS, needs) if need]


def _fused_setup_context(ctx, inputs, output) -> None:
    x, xd, weight, bias, lora_a, lora_b, scale = inputs
    ctx.scale, ctx.bias_dtype = scale, None if bias is None else bias.dtype
    ctx.save_for_backward(x, xd, weight, lora_a, lora_b, output[1])  # x (x̃ with dropout) and h only
    ctx.mark_non_differentiable(output[1])


def _fused_backward(ctx, dy, _dh):
    x, xd, weight, lora_a, lora_b, h = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = iter(lora_fused_bwd(dy, x, xd, weight, lora_a, lora_b, h, ctx.scale, ctx.bias_dtype, needs))
    return (*(next(grads) if need else None for need in needs), None)


torch.library.register_autograd("lightning_peft::lora_fused_fwd", _fused_backward, setup_context=_fused_setup_context)


def lora_linear_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """:func:`~lightning_peft.kernels.reference.lora_linear_reference` computed by the Triton kernels.

    Runs on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``. Checks shapes (ValueError),
    dtypes and devices (TypeError/ValueError) and the rank (``r <= 128``). Under ``torch.autocast``
    the inputs are cast to the autocast dtype first, as ``F.linear`` does. ``bias``, ``lora_a`` and
    ``lora_b`` may be fp32 masters on a 16-bit ``x``/``weight``: their operands are rounded to x's
    dtype inside the kernels and their gradients come back in fp32 (fp32 sums, never 16-bit ones).
    """
    check_lora_args(x, weight, bias, lora_a, lora_b)
    r = lora_a.shape[0]
    if r > MAX_LORA_RANK:
        raise ValueError(f"LoRA rank r={r} is larger than the Triton kernels' maximum {MAX_LORA_RANK}; "
                         "use lora_linear_reference (lora_linear falls back to it by itself)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    check_device(x)
    x, weight, bias, lora_a, lora_b = autocast_cast(x.device.type, x, weight, bias, lora_a, lora_b)
    check_dtypes({"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b}, x.device,
                 masters=("bias", "lora_a", "lora_b"))
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xd = F.dropout(x2, dropout_p, training=True) if dropout_p > 0 else None
    y, _ = lora_fused_fwd(x2, xd, weight, bias, lora_a, lora_b, float(scale))
    return y.reshape(*lead, n)
