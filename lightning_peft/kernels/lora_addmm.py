"""LoRA linear on cuBLAS: skinny kernels for the rank-r terms, ``addmm`` with beta=1 for the big GEMMs.

The second path of :func:`~lightning_peft.kernels.lora_linear` beside the fused GEMM of :mod:`.lora`,
taken for fp32 inputs, calls without gradients, small M and GPUs other than Hopper, and on Hopper for the
shapes where it times faster (:func:`~lightning_peft.kernels.dispatch.lora_route` decides, with :mod:`.path_tuning`). ``W + B·A`` is never formed.

Shapes: ``x`` ``(M, K)`` (leading dims flattened), ``W`` ``(N, K)``, ``bias`` ``(N,)``, ``A`` ``(r, K)``,
``B`` ``(N, r)``, ``s`` a float, ``x̃ = drop(x)``.

Forward: ``u = x̃·Aᵀ`` ``(M, r)`` (skinny, fp32 sums and result), ``t = s·u·Bᵀ (+ bias)`` ``(M, N)``
(a GEMM of inner size r), then ``y = t + x·Wᵀ``: cuBLAS ``addmm_`` into t with beta=1.

Backward, saved x (x̃ with dropout) and u only: ``(dh, dB) = (s·dy·B, s·dyᵀ·u)`` from one read of dy,
``dx = dh·A + dy·W`` (``dh·A`` first, then cuBLAS ``addmm_`` into it), ``dA = dhᵀ·x̃`` ``(r, K)``
(skinny, split along M); ``dW = dyᵀ·x`` and ``dbias = Σ_rows dy`` when the base trains. With dropout,
``dx = dy·W`` and ``dx̃ = dh·A`` (torch's dropout backward applies the mask).

The skinny ops are the Triton kernels of :mod:`.lora` (``ops="triton"``: CUDA, or CPU under the
interpreter) or their PyTorch references :func:`skinny_torch` / :func:`dy_pass_torch` (``ops="torch"``,
any device): the same precision, operands rounded to x's dtype and fp32 sums and results.
This module does not import triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .limits import MAX_LORA_RANK
from .reference import autocast_cast, check_lora_args, check_master_dtypes, device_guard

__all__ = ["LoRAAccumulateFunction", "LoRAAddmmFunction", "dy_pass_torch", "lora_accumulate", "lora_linear_addmm", "skinny_torch"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def skinny_torch(p: Tensor, q: Tensor, split: bool = False) -> Tensor:
    """``p·q`` ``(I, R)`` for a long-by-small ``q`` ``(L, R)``: operands in p's dtype, fp32 sums and result.

    The reference of the Triton skinny kernel (``split`` only changes how the kernel divides L).
    """
    acc = _acc(p.dtype)
    return p.to(acc) @ q.to(p.dtype).to(acc)


def dy_pass_torch(dy: Tensor, h: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(dh, dB) = (s·dy·B, s·dyᵀ·h)`` ``((M, r), (N, r))``: operands in dy's dtype, fp32 sums and results."""
    acc = _acc(dy.dtype)
    d = dy.to(acc)
    return (d @ lora_b.to(dy.dtype).to(acc)) * scale, (d.t() @ h.to(dy.dtype).to(acc)) * scale


def _rank_r_backward(
    ops: tuple, dy: Tensor, src: Tensor | None, u: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
    need_a: bool, need_b: bool, need_input: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the rank-r term ``s·(x̃·Aᵀ)·Bᵀ`` from one read of ``dy`` ``(M, N)``: ``(dh·A, dA, dB)``.

    ``dh = s·dy·B`` and ``dB = s·dyᵀ·u`` ``(N, r)`` (``u = x̃·Aᵀ`` ``(M, r)``), ``dA = dhᵀ·x̃`` ``(r, K)`` from
    ``src`` = x̃ ``(M, K)``, and ``dh·A`` ``(M, K)`` in dy's dtype for the input's gradient; ``None`` where not needed.
    """
    skinny, dy_pass = ops
    rank = da = db = None
    if need_a or need_b or need_input:
        dh, db = dy_pass(dy, u, lora_b, scale)
        db = db.to(lora_b.dtype) if need_b else None
        if need_a:  # dA = dhᵀ·x̃, as (x̃ᵀ·dh)ᵀ
            da = skinny(src.t(), dh, split=True).t().to(lora_a.dtype).contiguous()
        if need_input:
            rank = torch.mm(dh.to(dy.dtype), lora_a.to(dy.dtype))
    return rank, da, db


def _accumulate(c: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
    """``c + a·b`` (``c + a`` when b is None) written into ``c`` (no second output buffer); out of place while
    ``torch.compile`` traces: an in-place op on the tensor an ``autograd.Function.forward`` returns makes
    torch 2.11's dynamo route its gradient to the wrong output, zero gradients for every input (pytorch#180642;
    torch 2.14 is right either way, and inductor plans the buffers itself)."""
    if torch.compiler.is_compiling():
        return c + a if b is None else torch.addmm(c, a, b)
    return c.add_(a) if b is None else c.addmm_(a, b)


class LoRAAddmmFunction(torch.autograd.Function):
    """Autograd wrapper of the path (module docstring); 2-D inputs, ``ops = (skinny, dy_pass)``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, xd, weight, bias, lora_a, lora_b, scale, ops):
        skinny, _ = ops
        dt = x.dtype
        with device_guard(x):
            u = skinny(x if xd is None else xd, lora_a.t())  # (M, r) fp32: x̃·Aᵀ
            us, bt = (u * scale).to(dt), lora_b.to(dt).t()
            y = torch.mm(us, bt) if bias is None else torch.addmm(bias.to(dt), us, bt)  # the rank-r output
            y = _accumulate(y, x, weight.t())  # beta=1: cuBLAS accumulates x·Wᵀ onto it
        ctx.scale, ctx.ops = scale, ops
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, xd, weight, lora_a, lora_b, u)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, xd, weight, lora_a, lora_b, u = ctx.saved_tensors
        need_x, need_xd, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        dx = dxd = dw = dbias = None
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        with device_guard(dy):
            rank, da, db = _rank_r_backward(ctx.ops, dy, x if xd is None else xd, u, lora_a, lora_b, ctx.scale,
                                            need_a, need_b, need_x or need_xd)
            if need_x or need_xd:
                if xd is None:
                    dx = rank.addmm_(dy, weight)  # beta=1: cuBLAS accumulates dy·W onto it
                else:
                    dxd = rank if need_xd else None
                    dx = torch.mm(dy, weight) if need_x else None
            if need_w:
                dw = torch.mm(dy.t(), x)
            if need_bias:
                dbias = dy.sum(0, dtype=ctx.bias_dtype)
        return dx, dxd, dw, dbias, da, db, None, None


def lora_linear_addmm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    ops: str = "auto",
) -> Tensor:
    """:func:`~lightning_peft.kernels.reference.lora_linear_reference` on cuBLAS with skinny rank-r kernels.

    ``ops``: ``"triton"`` (the Triton skinny kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``; ``r <= 128``),
    ``"torch"`` (their references, any device) or ``"auto"`` (Triton for CUDA tensors when it imports).
    ``x`` and ``weight`` share a dtype; ``bias``, ``lora_a``, ``lora_b`` have it too or are fp32 masters on a
    16-bit x (gradients then in fp32). Under ``torch.autocast`` the inputs are cast first, as ``F.linear`` does.

    Example:
        >>> x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
        >>> a, b = torch.randn(4, 8), torch.randn(6, 4)
        >>> from lightning_peft.kernels import lora_linear_reference
        >>> y = lora_linear_addmm(x, w, None, a, b, 0.5, ops="torch")
        >>> torch.allclose(y, lora_linear_reference(x, w, None, a, b, 0.5), atol=1e-5)
        True
    """
    check_lora_args(x, weight, bias, lora_a, lora_b)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    fns = _ops(ops, x, lora_a.shape[0])
    x, weight, bias, lora_a, lora_b = autocast_cast(x.device.type, x, weight, bias, lora_a, lora_b)
    if weight.dtype != x.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but weight is {weight.dtype}; cast them to one dtype")
    check_master_dtypes(x, "x", {"bias": bias, "lora_a": lora_a, "lora_b": lora_b})
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xd = F.dropout(x2, dropout_p, training=True) if dropout_p > 0 else None
    with torch.autocast(x.device.type, enabled=False):
        y = LoRAAddmmFunction.apply(x2, xd, weight, bias, lora_a, lora_b, float(scale), fns)
    return y.reshape(*lead, n)


class LoRAAccumulateFunction(torch.autograd.Function):
    """``y`` plus ``s·(x̃·Aᵀ)·Bᵀ + bias`` on ``rows``; 2-D ``y`` ``(M, N)`` and ``x`` ``(M, K)``, ``ops = (skinny, dy_pass)``.

    ``rows`` ``(m,)`` int64 or ``None`` (every row); ``xd`` ``(m, K)`` is the dropped-out ``x[rows]`` or ``None``.
    Saves x (x̃ with dropout) and ``u = x̃·Aᵀ`` ``(m, r)`` only. Backward, with ``dy_r = dy[rows]``:
    ``(dh, dB) = (s·dy_r·B, s·dy_rᵀ·u)``, ``dA = dhᵀ·x̃`` ``(r, K)``, ``dx[rows] = dh·A``, ``dbias = Σ dy_r``
    and ``dy`` itself for ``y``.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, y, x, xd, lora_a, lora_b, bias, rows, scale, ops):
        skinny, _ = ops
        dt = y.dtype
        with device_guard(x):
            src = xd if xd is not None else (x if rows is None else x.index_select(0, rows))
            u = skinny(src, lora_a.t())  # (m, r) fp32: x̃·Aᵀ
            us, bt = (u * scale).to(dt), lora_b.to(dt).t()
            if rows is None:
                out = torch.addmm(y, us, bt)  # one read of y, one write of the sum
                if bias is not None:
                    out = _accumulate(out, bias.to(dt))
            else:
                t = torch.mm(us, bt) if bias is None else torch.addmm(bias.to(dt), us, bt)
                out = y.index_add(0, rows, t)
        ctx.scale, ctx.ops, ctx.n_rows = scale, ops, x.shape[0]
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x if xd is None else None, xd, lora_a, lora_b, u, rows)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, xd, lora_a, lora_b, u, rows = ctx.saved_tensors
        _, need_x, need_xd, need_a, need_b, need_bias = ctx.needs_input_grad[:6]
        dx = dxd = dbias = None
        dyr = dy if rows is None else dy.index_select(0, rows)
        dyr = dyr if dyr.stride(-1) == 1 else dyr.contiguous()
        with device_guard(dy):
            src = (xd if xd is not None else (x if rows is None else x.index_select(0, rows))) if need_a else None
            rank, da, db = _rank_r_backward(ctx.ops, dyr, src, u, lora_a, lora_b, ctx.scale, need_a, need_b, need_x or need_xd)
            if need_x or need_xd:
                if need_xd:
                    dxd = rank
                elif rows is None:
                    dx = rank
                else:
                    dx = rank.new_zeros((ctx.n_rows, rank.shape[1])).index_add_(0, rows, rank)
            if need_bias:
                dbias = dyr.sum(0, dtype=ctx.bias_dtype)
        return dy, dx, dxd, da, db, dbias, None, None, None


def _ops(ops: str, x: Tensor, r: int) -> tuple:
    """The ``(skinny, dy_pass)`` pair for ``ops`` (see :func:`lora_linear_addmm`)."""
    if ops == "auto":
        from .dispatch import triton_available

        ops = "triton" if x.is_cuda and triton_available() else "torch"
    if ops == "triton":
        if r > MAX_LORA_RANK:
            raise ValueError(f"LoRA rank r={r} is larger than the Triton kernels' maximum {MAX_LORA_RANK}")
        from ._triton_common import check_device
        from .lora import lora_dy_pass, lora_skinny

        check_device(x)
        return lora_skinny, lora_dy_pass
    if ops == "torch":
        return skinny_torch, dy_pass_torch
    raise ValueError(f"ops must be 'auto', 'triton' or 'torch', got {ops!r}")


def lora_accumulate(
    y: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    bias: Tensor | None = None,
    rows: Tensor | None = None,
    ops: str = "auto",
) -> Tensor:
    """``y + s·(drop(x)·Aᵀ)·Bᵀ + bias`` on the items ``rows`` of x's first dim: the rank-r term accumulated onto ``y``.

    One more LoRA adapter on an output that has its base GEMM already (several adapters, mixed batches): one
    ``addmm`` onto y (``index_add`` for rows), no full-size intermediate of its own. Shapes: ``y`` ``(B, ..., N)`` (the output of a
    differentiable op or any tensor), ``x`` ``(B, ..., K)``, ``lora_a`` ``(r, K)``, ``lora_b`` ``(N, r)``,
    ``bias`` ``(N,)`` or ``None``, ``rows`` ``(b,)`` indices into ``B`` or ``None`` (all). Returns the sum
    (y itself is not modified: autograd and ``torch.compile`` stay simple). The adapter tensors have x's dtype or are fp32 masters on a 16-bit x (fp32 gradients);
    ``ops`` as in :func:`lora_linear_addmm`. Saves x (x̃ with dropout) and ``x̃·Aᵀ`` only.

    Example:
        >>> x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
        >>> a, b = torch.randn(4, 8), torch.randn(6, 4)
        >>> y = lora_accumulate(x @ w.t(), x, a, b, 0.5, rows=torch.tensor([1]), ops="torch")
        >>> torch.allclose(y[1], x[1] @ w.t() + 0.5 * (x[1] @ a.t()) @ b.t(), atol=1e-5), torch.equal(y[0], x[0] @ w.t())
        (True, True)
    """
    n, k = lora_b.shape[0], x.shape[-1]
    check_lora_args(x, lora_b.new_empty((n, k)), bias, lora_a, lora_b)
    if y.shape != (*x.shape[:-1], n):
        raise ValueError(f"y must have shape {(*x.shape[:-1], n)} (x's leading dims, out_features), got {tuple(y.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    fns = _ops(ops, x, lora_a.shape[0])
    x, lora_a, lora_b, bias = autocast_cast(x.device.type, x, lora_a, lora_b, bias)
    check_master_dtypes(x, "x", {"bias": bias, "lora_a": lora_a, "lora_b": lora_b})
    if y.dtype != x.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but y is {y.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    flat = None
    if rows is not None:  # items of the first dim -> rows of the flattened (M, K)
        per = x2.shape[0] // max(1, x.shape[0]) if x.dim() > 1 else 1
        rows = rows.to(device=x.device, dtype=torch.long)
        flat = (rows[:, None] * per + torch.arange(per, device=x.device)).reshape(-1)
    xd = None
    if dropout_p > 0:
        xd = F.dropout(x2 if flat is None else x2.index_select(0, flat), dropout_p, training=True)
    with torch.autocast(x.device.type, enabled=False):
        out = LoRAAccumulateFunction.apply(y.reshape(-1, n), x2, xd, lora_a, lora_b, bias, flat, float(scale), fns)
    return out.reshape(y.shape)
