"""Fused RoI feature + box position embedding of LXMERT's visual stream (``visn_fc`` in the checkpoints).

    a = feats W_f^T + b_f                      the 2048 -> hidden GEMM: stays a library GEMM (F.linear)
    p = boxes W_p^T + b_p                      4 box coordinates -> hidden, computed in the kernel
    y = (LN(a; g_f, beta_f) + LN(p; g_p, beta_p)) / 2

One kernel reads a and boxes and writes y (plus fp32 mean/rstd of both LayerNorms per row); p is never stored: the
backward kernel recomputes it from the 4 box numbers. Backward processes many rows per program and reduces every
parameter gradient (g_f, beta_f, g_p, beta_p, b_p, W_p) into fp32 per-program partials finished by one small sum.

Limits: hidden N <= 8192; exactly 4 box coordinates (LXMERT's x1, y1, x2, y2); fewer than 2**31 elements; a and y
share a dtype (fp32, fp16, bf16), boxes and parameters may be any float dtype; accumulation in fp32.

Backward derivation (per row, u = dy / 2; LN'(x; g) maps u to rstd * (gu - mean(gu) - xhat * mean(gu * xhat))):
    d g_f = sum_rows u * xhat_a     d beta_f = d beta_p = sum_rows u     d g_p = sum_rows u * xhat_p
    da = LN'(a; g_f)(u)             dp = LN'(p; g_p)(u)
    d b_p = sum_rows dp             d W_p = dp^T boxes              d boxes = dp W_p
The GEMM's own gradients (feats, W_f, b_f) come from autograd through F.linear.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._utils import block_size, layernorm_rows, num_programs, pick, row_block, row_tile, rows_2d

MAX_HIDDEN = 8192


def roi_position_embedding_ref(
    feats, boxes, feat_weight, feat_bias, feat_ln_weight, feat_ln_bias, box_weight, box_bias, box_ln_weight,
    box_ln_bias, eps=1e-12,
):
    """Plain PyTorch, as in HF's LxmertVisualFeatureEncoder (without its dropout)."""
    n = feat_weight.shape[0]
    x = F.layer_norm(F.linear(feats, feat_weight, feat_bias), (n,), feat_ln_weight, feat_ln_bias, eps)
    y = F.layer_norm(F.linear(boxes, box_weight, box_bias), (n,), box_ln_weight, box_ln_bias, eps)
    return (x + y) / 2


@triton.jit
def _box_columns(WpT, cols, col_ok, N):
    """The 4 columns of W_p, each (BLOCK_N,) fp32, read coalesced from its transpose W_p^T (4, N)."""
    w0 = tl.load(WpT + cols, mask=col_ok, other=0.0).to(tl.float32)
    w1 = tl.load(WpT + N + cols, mask=col_ok, other=0.0).to(tl.float32)
    w2 = tl.load(WpT + 2 * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    w3 = tl.load(WpT + 3 * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    return w0, w1, w2, w3


@triton.jit
def _box_rows(Boxes, rows, row_ok):
    """The 4 coordinates of each box, each (BLOCK_M,) fp32."""
    b0 = tl.load(Boxes + rows * 4, mask=row_ok, other=0.0).to(tl.float32)
    b1 = tl.load(Boxes + rows * 4 + 1, mask=row_ok, other=0.0).to(tl.float32)
    b2 = tl.load(Boxes + rows * 4 + 2, mask=row_ok, other=0.0).to(tl.float32)
    b3 = tl.load(Boxes + rows * 4 + 3, mask=row_ok, other=0.0).to(tl.float32)
    return b0, b1, b2, b3


@triton.jit
def _box_projection(bp, w0, w1, w2, w3, b0, b1, b2, b3):
    """p = boxes W_p^T + b_p for a tile of rows, (BLOCK_M, BLOCK_N) fp32, from W_p's columns and the coordinates."""
    return bp[None, :] + b0[:, None] * w0[None, :] + b1[:, None] * w1[None, :] + b2[:, None] * w2[None, :] \
        + b3[:, None] * w3[None, :]


@triton.jit
def _roi_embedding_fwd_kernel(
    A,  # (M, N) feats W_f^T + b_f
    Boxes,  # (M, 4) box coordinates
    Gf, Bf,  # (N,) feature LayerNorm weight, bias
    WpT, Bp,  # (4, N) box projection weight, transposed; (N,) its bias
    Gp, Bb,  # (N,) box LayerNorm weight, bias
    Y,  # (M, N) output
    MeanA, RstdA, MeanP, RstdP,  # (M,) fp32 LayerNorm statistics, for backward
    M, N, eps,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    rows, cols, row_ok, col_ok, ok, offs = row_block(M, N, BLOCK_M, BLOCK_N)  # offs: (BLOCK_M, BLOCK_N)
    a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
    w0, w1, w2, w3 = _box_columns(WpT, cols, col_ok, N)
    b0, b1, b2, b3 = _box_rows(Boxes, rows, row_ok)
    bp = tl.load(Bp + cols, mask=col_ok, other=0.0).to(tl.float32)
    p = _box_projection(bp, w0, w1, w2, w3, b0, b1, b2, b3)
    xhat_a, mean_a, rstd_a = layernorm_rows(a, ok, N, eps)
    xhat_p, mean_p, rstd_p = layernorm_rows(p, ok, N, eps)
    gf = tl.load(Gf + cols, mask=col_ok, other=0.0).to(tl.float32)
    bf = tl.load(Bf + cols, mask=col_ok, other=0.0).to(tl.float32)
    gp = tl.load(Gp + cols, mask=col_ok, other=0.0).to(tl.float32)
    bb = tl.load(Bb + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = 0.5 * (xhat_a * gf[None, :] + xhat_p * gp[None, :] + (bf + bb)[None, :])
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MeanA + rows, mean_a, mask=row_ok)
    tl.store(RstdA + rows, rstd_a, mask=row_ok)
    tl.store(MeanP + rows, mean_p, mask=row_ok)
    tl.store(RstdP + rows, rstd_p, mask=row_ok)


@triton.jit
def _ln_input_grad(u, xhat, g, rstd, ok, N):
    """Gradient of LayerNorm's input for output gradient u: rstd * (gu - mean(gu) - xhat * mean(gu * xhat))."""
    gu = u * g[None, :]
    mean_gu = tl.sum(gu, axis=1) / N
    mean_gux = tl.sum(gu * xhat, axis=1) / N
    return tl.where(ok, (gu - mean_gu[:, None] - xhat * mean_gux[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _saved_xhat(x, Mean, Rstd, rows, row_ok, ok):
    """x normalised with the statistics forward saved (zero outside the tile), and rstd (BLOCK_M,)."""
    mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    return tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0), rstd


@triton.jit
def _store_box_grads(DBoxes, rows, row_ok, dp, w0, w1, w2, w3):
    """d boxes = dp W_p: one coordinate's (BLOCK_M,) gradients per column of W_p."""
    out_t = DBoxes.dtype.element_ty
    tl.store(DBoxes + rows * 4, tl.sum(dp * w0[None, :], axis=1).to(out_t), mask=row_ok)
    tl.store(DBoxes + rows * 4 + 1, tl.sum(dp * w1[None, :], axis=1).to(out_t), mask=row_ok)
    tl.store(DBoxes + rows * 4 + 2, tl.sum(dp * w2[None, :], axis=1).to(out_t), mask=row_ok)
    tl.store(DBoxes + rows * 4 + 3, tl.sum(dp * w3[None, :], axis=1).to(out_t), mask=row_ok)


@triton.jit
def _store_partials(Partials, pid, cols, col_ok, N, dgf, dbeta, dgp, dbp, dw0, dw1, dw2, dw3):
    """This program's eight (BLOCK_N,) parameter-gradient partials, in Partials (8, programs, N)."""
    stride = tl.num_programs(0) * N  # between the 8 partial arrays
    base = Partials + pid * N + cols
    tl.store(base, dgf, mask=col_ok)
    tl.store(base + stride, dbeta, mask=col_ok)
    tl.store(base + 2 * stride, dgp, mask=col_ok)
    tl.store(base + 3 * stride, dbp, mask=col_ok)
    tl.store(base + 4 * stride, dw0, mask=col_ok)
    tl.store(base + 5 * stride, dw1, mask=col_ok)
    tl.store(base + 6 * stride, dw2, mask=col_ok)
    tl.store(base + 7 * stride, dw3, mask=col_ok)


@triton.jit
def _roi_embedding_bwd_kernel(
    DY,  # (M, N) gradient of y
    A, Boxes, Gf, WpT, Bp, Gp,  # forward inputs (WpT: (4, N))
    MeanA, RstdA, MeanP, RstdP,  # (M,) fp32 from forward
    DA,  # (M, N) gradient of a
    DBoxes,  # (M, 4) gradient of boxes
    Partials,  # (8, programs, N) fp32: d g_f, d beta (both biases), d g_p, d b_p, d W_p^T rows 0..3
    M, N, rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    gf = tl.load(Gf + cols, mask=col_ok, other=0.0).to(tl.float32)
    gp = tl.load(Gp + cols, mask=col_ok, other=0.0).to(tl.float32)
    bp = tl.load(Bp + cols, mask=col_ok, other=0.0).to(tl.float32)
    w0, w1, w2, w3 = _box_columns(WpT, cols, col_ok, N)
    dgf = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbeta = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dgp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dw0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows, row_ok, ok, offs = row_tile(start, row_end, cols, col_ok, N, BLOCK_M)  # offs: (BLOCK_M, BLOCK_N)
        a = tl.load(A + offs, mask=ok, other=0.0).to(tl.float32)
        b0, b1, b2, b3 = _box_rows(Boxes, rows, row_ok)
        p = _box_projection(bp, w0, w1, w2, w3, b0, b1, b2, b3)
        xhat_a, rstd_a = _saved_xhat(a, MeanA, RstdA, rows, row_ok, ok)
        xhat_p, rstd_p = _saved_xhat(p, MeanP, RstdP, rows, row_ok, ok)
        u = 0.5 * tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        dgf += tl.sum(u * xhat_a, axis=0)
        dgp += tl.sum(u * xhat_p, axis=0)
        dbeta += tl.sum(u, axis=0)
        da = _ln_input_grad(u, xhat_a, gf, rstd_a, ok, N)
        tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=ok)
        dp = _ln_input_grad(u, xhat_p, gp, rstd_p, ok, N)  # (BLOCK_M, BLOCK_N), zero outside
        dbp += tl.sum(dp, axis=0)
        dw0 += tl.sum(dp * b0[:, None], axis=0)
        dw1 += tl.sum(dp * b1[:, None], axis=0)
        dw2 += tl.sum(dp * b2[:, None], axis=0)
        dw3 += tl.sum(dp * b3[:, None], axis=0)
        _store_box_grads(DBoxes, rows, row_ok, dp, w0, w1, w2, w3)
    _store_partials(Partials, pid, cols, col_ok, N, dgf, dbeta, dgp, dbp, dw0, dw1, dw2, dw3)


def _tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about 4K elements per tile (4 rows at hidden 768)."""
    block_n = block_size(n, 16)
    return max(1, min(16, 4096 // block_n)), block_n, 8 if block_n >= 2048 else 4


# Launchers take ``wrap``: wrap_triton inside the registered custom ops (torch.compile traces their bodies and sees
# the kernels), the bare kernel for eager calls (see _utils.pick). Both paths also run under TRITON_INTERPRET on CPU.
def _roi_embedding_fwd_impl(
    wrap, a, boxes, feat_ln_weight, feat_ln_bias, box_weight_t, box_bias, box_ln_weight, box_ln_bias, eps
):
    m, n = a.shape  # contiguous (rows, hidden); boxes (rows, 4); box_weight_t (4, hidden)
    y = torch.empty_like(a)
    stats = [torch.empty(m, device=a.device, dtype=torch.float32) for _ in range(4)]
    block_m, block_n, warps = _tile(n)
    wrap(_roi_embedding_fwd_kernel)[(triton.cdiv(m, block_m),)](
        a, boxes, feat_ln_weight, feat_ln_bias, box_weight_t, box_bias, box_ln_weight, box_ln_bias, y, *stats,
        m, n, eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y, *stats


@triton_op("lxmert_fast::roi_position_embedding_fwd", mutates_args=())
def _roi_embedding_fwd(
    a: torch.Tensor, boxes: torch.Tensor, feat_ln_weight: torch.Tensor, feat_ln_bias: torch.Tensor,
    box_weight_t: torch.Tensor, box_bias: torch.Tensor, box_ln_weight: torch.Tensor, box_ln_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _roi_embedding_fwd_impl(
        wrap_triton, a, boxes, feat_ln_weight, feat_ln_bias, box_weight_t, box_bias, box_ln_weight, box_ln_bias, eps
    )


def _roi_embedding_bwd_impl(
    wrap, dy, a, boxes, feat_ln_weight, box_weight_t, box_bias, box_ln_weight, mean_a, rstd_a, mean_p, rstd_p
):
    m, n = a.shape
    block_m, block_n, warps = _tile(n)
    # Eight per-program fp32 partial rows plus the tiles overflow 4 warps' registers and spill at LXMERT's hidden
    # sizes. 8 warps hold them without spilling (16 spill again), and one such program per SM keeps the resident warps
    # per SM and halves the partials written and summed (`python benchmarks/kernel_resources.py` shows registers and
    # spills per launch without a GPU).
    warps, per_sm = (8, 1) if block_n >= 1024 else (warps, 2)
    programs = max(1, min(num_programs(a.device, per_sm=per_sm), triton.cdiv(m, block_m)))
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    da = torch.empty_like(a)
    dboxes = torch.empty_like(boxes)
    partials = torch.empty(8, programs, n, device=a.device, dtype=torch.float32)
    wrap(_roi_embedding_bwd_kernel)[(programs,)](
        dy, a, boxes, feat_ln_weight, box_weight_t, box_bias, box_ln_weight, mean_a, rstd_a, mean_p, rstd_p,
        da, dboxes, partials, m, n, rows_per_program, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    sums = partials.sum(1)  # (8, N): one reduction for all parameter gradients
    return da, dboxes, sums[0], sums[1], sums[4:].t(), sums[3], sums[2]  # d W_p as (N, 4)


@triton_op("lxmert_fast::roi_position_embedding_bwd", mutates_args=())
def _roi_embedding_bwd(
    dy: torch.Tensor, a: torch.Tensor, boxes: torch.Tensor, feat_ln_weight: torch.Tensor, box_weight_t: torch.Tensor,
    box_bias: torch.Tensor, box_ln_weight: torch.Tensor, mean_a: torch.Tensor, rstd_a: torch.Tensor,
    mean_p: torch.Tensor, rstd_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    da, dboxes, *param_grads = _roi_embedding_bwd_impl(
        wrap_triton, dy, a, boxes, feat_ln_weight, box_weight_t, box_bias, box_ln_weight, mean_a, rstd_a, mean_p,
        rstd_p,
    )
    return da, dboxes, *(g.clone() for g in param_grads)  # custom-op outputs may not alias: rows of one sum


class _RoiEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, boxes, feat_ln_weight, feat_ln_bias, box_weight, box_bias, box_ln_weight, box_ln_bias, eps):
        a2, boxes2 = rows_2d(a), rows_2d(boxes)  # (rows, hidden), (rows, 4)
        params = [t.contiguous() for t in (feat_ln_weight, feat_ln_bias, box_weight.t(), box_bias, box_ln_weight,
                                           box_ln_bias)]  # box weight as (4, hidden): coalesced column reads
        fwd = pick(torch.ops.lxmert_fast.roi_position_embedding_fwd, _roi_embedding_fwd_impl)
        y, *stats = fwd(a2, boxes2, *params, eps)
        ctx.save_for_backward(a2, boxes2, params[0], params[2], params[3], params[4], *stats)
        ctx.shapes = (a.shape, boxes.shape)
        ctx.dtypes = [t.dtype for t in (feat_ln_weight, feat_ln_bias, box_weight, box_bias, box_ln_weight,
                                        box_ln_bias)]
        return y.view(a.shape)

    @staticmethod
    def backward(ctx, dy):
        a_shape, boxes_shape = ctx.shapes
        bwd = pick(torch.ops.lxmert_fast.roi_position_embedding_bwd, _roi_embedding_bwd_impl)
        da, dboxes, dgf, dbeta, dwp, dbp, dgp = bwd(rows_2d(dy), *ctx.saved_tensors)
        # Both LayerNorm biases receive the same gradient; a clone keeps the two .grad tensors from aliasing.
        grads = [g.to(t) for g, t in zip((dgf, dbeta, dwp, dbp, dgp, dbeta.clone()), ctx.dtypes, strict=True)]
        return da.view(a_shape), dboxes.view(boxes_shape), *grads, None


def roi_position_embedding(
    feats, boxes, feat_weight, feat_bias, feat_ln_weight, feat_ln_bias, box_weight, box_bias, box_ln_weight,
    box_ln_bias, eps=1e-12,
):
    """(LN(feats W_f^T + b_f) + LN(boxes W_p^T + b_p)) / 2; feats (..., F), boxes (..., K) -> (..., hidden).

    The F -> hidden GEMM runs as F.linear (cuBLAS); everything after it is one Triton kernel (and one in backward).
    """
    n, k = box_weight.shape
    if boxes.shape[-1] != k or boxes.shape[:-1] != feats.shape[:-1] or feat_weight.shape[0] != n:
        raise ValueError(
            f"feats {tuple(feats.shape)}, boxes {tuple(boxes.shape)}, feat_weight {tuple(feat_weight.shape)} and "
            f"box_weight {tuple(box_weight.shape)} do not fit together"
        )
    if n > MAX_HIDDEN or k != 4:
        raise ValueError(f"roi_position_embedding supports hidden <= {MAX_HIDDEN} and 4 box coordinates")
    if feats.numel() // feats.shape[-1] * n >= 2**31:
        raise ValueError("roi_position_embedding supports fewer than 2**31 output elements (int32 offsets)")
    a = F.linear(feats, feat_weight, feat_bias)  # (..., hidden): the GEMM stays in the BLAS library
    return _RoiEmbedding.apply(a, boxes, feat_ln_weight, feat_ln_bias, box_weight, box_bias, box_ln_weight,
                               box_ln_bias, eps)
