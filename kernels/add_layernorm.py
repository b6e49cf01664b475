"""Fused dropout + residual add + LayerNorm: the post-norm output of every LXMERT sublayer.

    h = dropout(x) + residual                  dropout mask from Philox(seed, element index), scale 1 / (1 - p)
    y = (h - mean(h)) * rstd * weight + bias   rstd = 1 / sqrt(var(h) + eps), statistics over the last dim, in fp32

Forward reads x and residual once and writes y plus two fp32 numbers per row (mean, rstd); the dropout mask is never
stored: backward regenerates it from the seed. Backward recomputes h from x and residual (the same bytes a stored h
would cost) and processes many rows per program, reducing dW/dB into fp32 per-program partials that one small sum
finishes (one row per program plus a separate reduction loses to PyTorch at hidden 768).

Limits: last dim N <= 8192 (one row fits in one tile); numel < 2**31 (int32 offsets, also the Philox counter);
x, residual and y share one dtype (fp32, fp16, bf16); weight/bias may be any float dtype; accumulation in fp32.

Backward derivation (per row, N = hidden size, xhat = (h - mean) * rstd, g = dy * weight):
    dweight = sum_rows dy * xhat        dbias = sum_rows dy
    dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dresidual = dh                       dx = dh * mask / (1 - p)     (p = 0: dx is dresidual, written once)
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._utils import (
    block_size,
    dropout_scale,
    dropout_seed,
    layernorm_rows,
    num_programs,
    pick,
    row_block,
    row_tile,
    rows_2d,
    seed_slot,
)

MAX_HIDDEN = 8192


def add_layernorm_ref(x, residual, weight, bias, eps=1e-12, dropout_p=0.0, training=False, dropout_mask=None):
    """Plain PyTorch: LayerNorm(dropout(x) + residual). With ``dropout_mask`` (bool, x's shape) that mask is used."""
    if dropout_mask is not None:
        x = x * dropout_mask / (1.0 - dropout_p)
    else:
        x = F.dropout(x, dropout_p, training)
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


@triton.jit
def _keep(seed, offsets, dropout_p):
    """Dropout keep-mask: one Philox draw per element index, so forward, backward and tests see the same mask."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_mask_kernel(
    Mask,  # (numel,) bool as uint8: 1 = kept
    numel,  # number of elements
    dropout_p,  # drop probability
    Seed,  # (1,) int64 Philox seed
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Mask + offs, _keep(tl.load(Seed), offs, dropout_p).to(tl.uint8), mask=offs < numel)


@triton.jit
def _add_layernorm_fwd_kernel(
    X,  # (M, N) sublayer output, before dropout
    R,  # (M, N) residual
    W,  # (N,) LayerNorm weight
    B,  # (N,) LayerNorm bias
    Y,  # (M, N) output
    Mean,  # (M,) fp32 row mean, for backward
    Rstd,  # (M,) fp32 row 1/std, for backward
    M,  # rows
    N,  # hidden size
    eps,  # LayerNorm epsilon
    dropout_p,  # drop probability (used only if HAS_DROPOUT)
    Seed,  # (1,) int64 Philox seed (read only if HAS_DROPOUT)
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    rows, cols, row_ok, col_ok, ok, offs = row_block(M, N, BLOCK_M, BLOCK_N)  # offs: (BLOCK_M, BLOCK_N)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        x = tl.where(_keep(tl.load(Seed), offs, dropout_p), x * dropout_scale(dropout_p), 0.0)
    xhat, mean, rstd = layernorm_rows(x + r, ok, N, eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xhat * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _add_layernorm_bwd_kernel(
    DY,  # (M, N) gradient of y
    X,  # (M, N) forward x
    R,  # (M, N) forward residual
    W,  # (N,) LayerNorm weight
    Mean,  # (M,) fp32 from forward
    Rstd,  # (M,) fp32 from forward
    DX,  # (M, N) gradient of x (written only if HAS_DROPOUT; otherwise it equals DR)
    DR,  # (M, N) gradient of residual
    DW,  # (programs, N) fp32 partial dweight, one row per program
    DB,  # (programs, N) fp32 partial dbias
    M,  # rows
    N,  # hidden size
    rows_per_program,  # a multiple of BLOCK_M
    dropout_p,  # drop probability (used only if HAS_DROPOUT)
    Seed,  # (1,) int64 Philox seed of the forward (read only if HAS_DROPOUT)
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per loop step
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows, row_ok, ok, offs = row_tile(start, row_end, cols, col_ok, N, BLOCK_M)  # offs: (BLOCK_M, BLOCK_N)
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep(tl.load(Seed), offs, dropout_p)  # (a scalar load: cached after the first)
            x = tl.where(keep, x * dropout_scale(dropout_p), 0.0)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x + r - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / N
        mean_gx = tl.sum(g * xhat, axis=1) / N
        dh = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
        tl.store(DR + offs, dh.to(DR.dtype.element_ty), mask=ok)
        if HAS_DROPOUT:  # without dropout dx equals dresidual: the caller uses DR for both, one write fewer
            dh = tl.where(keep, dh * dropout_scale(dropout_p), 0.0)
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW + pid * N + cols, dw, mask=col_ok)
    tl.store(DB + pid * N + cols, db, mask=col_ok)


def _tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about 4K elements per tile, so hidden 768 runs 4 rows per step."""
    block_n = block_size(n, 16)
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, 8 if block_n >= 2048 else 4


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    n = x.shape[-1]
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} {residual.dtype} differ")
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},)")
    if n > MAX_HIDDEN:
        raise ValueError(f"add_layernorm supports a last dim up to {MAX_HIDDEN}, got {n}")
    if x.numel() >= 2**31:
        raise ValueError("add_layernorm supports fewer than 2**31 elements (int32 offsets)")


# Launchers take ``wrap``: wrap_triton inside the registered custom ops (torch.compile traces their bodies and sees
# the kernels), the bare kernel for eager calls (see _utils.pick). Both paths also run under TRITON_INTERPRET on CPU.
def _add_layernorm_fwd_impl(wrap, x, residual, weight, bias, eps, dropout_p, seed):
    m, n = x.shape  # contiguous (rows, hidden)
    y = torch.empty_like(x)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    block_m, block_n, warps = _tile(n)
    wrap(_add_layernorm_fwd_kernel)[(triton.cdiv(m, block_m),)](
        x, residual, weight, bias, y, mean, rstd, m, n, eps, dropout_p, seed_slot(seed, x),
        HAS_DROPOUT=dropout_p > 0, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y, mean, rstd


@triton_op("lxmert_fast::add_layernorm_fwd", mutates_args=())
def _add_layernorm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_layernorm_fwd_impl(wrap_triton, x, residual, weight, bias, eps, dropout_p, seed)


def _add_layernorm_bwd_impl(wrap, dy, x, residual, weight, mean, rstd, dropout_p, seed):
    m, n = x.shape
    block_m, block_n, warps = _tile(n)
    programs = max(1, min(num_programs(x.device, per_sm=2), triton.cdiv(m, block_m)))
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    dr = torch.empty_like(residual)
    # without dropout dx == dresidual: no second tensor (an empty one, so the custom op's outputs do not alias)
    dx = torch.empty_like(x) if dropout_p > 0 else x.new_empty(0)
    partials = torch.empty(2, programs, n, device=x.device, dtype=torch.float32)  # dweight, dbias per program
    wrap(_add_layernorm_bwd_kernel)[(programs,)](
        dy, x, residual, weight, mean, rstd, dx if dropout_p > 0 else dr, dr, partials[0], partials[1], m, n,
        rows_per_program, dropout_p,
        seed_slot(seed, x), HAS_DROPOUT=dropout_p > 0, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    dw, db = partials.sum(1).to(weight.dtype)  # one reduction for both
    return dx, dr, dw, db


@triton_op("lxmert_fast::add_layernorm_bwd", mutates_args=())
def _add_layernorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dr, dw, db = _add_layernorm_bwd_impl(wrap_triton, dy, x, residual, weight, mean, rstd, dropout_p, seed)
    return dx, dr, dw.clone(), db.clone()  # custom-op outputs may not alias: dw, db are rows of one sum


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, seed):
        _check(x, residual, weight)
        x2, r2 = rows_2d(x), rows_2d(residual)  # (rows, hidden)
        y, mean, rstd = pick(torch.ops.lxmert_fast.add_layernorm_fwd, _add_layernorm_fwd_impl)(
            x2, r2, weight.contiguous(), bias.contiguous(), eps, dropout_p, seed
        )
        ctx.save_for_backward(x2, r2, weight.contiguous(), mean, rstd, seed)
        ctx.dropout_p, ctx.bias_dtype = dropout_p, bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, r2, weight, mean, rstd, seed = ctx.saved_tensors
        dx, dr, dw, db = pick(torch.ops.lxmert_fast.add_layernorm_bwd, _add_layernorm_bwd_impl)(
            rows_2d(dy), x2, r2, weight, mean, rstd, ctx.dropout_p, seed
        )
        if ctx.dropout_p == 0:
            dx = dr  # the same gradient: one tensor for both inputs, as autograd's own add does
        return dx.view(dy.shape), dr.view(dy.shape), dw, db.to(ctx.bias_dtype), None, None, None


def add_layernorm(x, residual, weight, bias, eps=1e-12, dropout_p=0.0, training=False, seed=None):
    """LayerNorm(dropout(x) + residual) over the last dim, fused; x and residual (..., N) of one dtype.

    Dropout applies only when ``training`` and ``dropout_p > 0``; ``seed`` (int) fixes its mask (the same seed gives
    the same mask, see ``add_layernorm_dropout_mask``); None draws one with torch's generator of x's device, which
    also works under CUDA-graph replay (each replay draws anew).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    p = dropout_p if training else 0.0
    seed_tensor = dropout_seed(seed, x.device) if p > 0 else None
    return _AddLayerNorm.apply(x, residual, weight, bias, eps, p, seed_tensor)


def add_layernorm_dropout_mask(shape, dropout_p, seed, device) -> torch.Tensor:
    """The keep-mask (bool, ``shape``) that ``add_layernorm(..., dropout_p, training=True, seed=seed)`` applies."""
    numel = 1
    for s in shape:
        numel *= s
    mask = torch.empty(numel, dtype=torch.uint8, device=device)
    _dropout_mask_kernel[(triton.cdiv(numel, 1024),)](mask, numel, dropout_p, dropout_seed(seed, device), BLOCK=1024)
    return mask.view(shape).bool()
