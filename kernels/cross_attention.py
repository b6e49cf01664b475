"""Bidirectional cross-attention: LXMERT's two cross directions (one shared weight set) in one kernel launch.

    lang_ctx = dropout(softmax(lang_q visn_k^T / sqrt(D) + visn key mask)) visn_v     (B, H, L, D)
    visn_ctx = dropout(softmax(visn_q lang_k^T / sqrt(D) + lang key mask)) lang_v     (B, H, V, D)

The grid is (B * H, 2): program (bh, 0) computes the language direction of one head, (bh, 1) the vision direction.
Each program holds its whole problem in one tile (queries x keys padded to powers of two), so there is no online
softmax: scores, probabilities and the context stay in registers. Masked keys get exactly zero probability. A query
whose keys are ALL masked gets an all-zero probability row, hence a zero context and zero gradients (not NaN); the
reference below defines the same. Attention dropout draws Philox(seed, tile element index) and is regenerated in
backward, never stored.

Limits: L and V <= 128 and head dim D <= 128 (one tile); ValueError beyond. Inputs may be any (B, H, *, D) views whose
last dim is contiguous, e.g. ``linear_out.view(B, L, H, D).transpose(1, 2)``; outputs and gradients are returned in
that same memory layout ((B, L, H, D) storage seen as (B, H, L, D)), so ``ctx.transpose(1, 2).reshape(B, L, H * D)``
is free. fp32 uses IEEE fp32 products (no TF32); fp16/bf16 use tensor cores with fp32 accumulation and softmax.

Backward derivation (one direction, scale c = 1/sqrt(D), S = c Q K^T, P = softmax(S), Pd = P * M / (1 - p), O = Pd V):
    dV = Pd^T dO                    dPd = dO V^T               dP = dPd * M / (1 - p)
    dS = P * (dP - rowsum(P * dP))  dQ = c dS K                dK = c dS^T Q
The (bh, 0) program writes d lang_q, d visn_k, d visn_v; the (bh, 1) program d visn_q, d lang_k, d lang_v: every
gradient has exactly one writer, so no atomics.
"""

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._utils import block_size, dropout_scale, dropout_seed, interpreted, pick, seed_slot

MAX_LEN = 128
MAX_HEAD_DIM = 128


def _attend_ref(q, k, v, key_mask, dropout_p, dropout_mask):
    """softmax(q k^T / sqrt(D)) v with key padding mask; an all-masked query row gives zeros."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if key_mask is not None:
        keep = key_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Lk)
        any_key = keep.any(-1, keepdim=True)
        # All-masked rows are softmaxed over zeros (finite, so no NaN in backward) and then multiplied by 0.
        scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~any_key, 0.0)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype) * any_key
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return probs @ v


def bidirectional_cross_attention_ref(
    lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask, dropout_p=0.0,
    lang_dropout_mask=None, visn_dropout_mask=None,
):
    """Plain PyTorch. Dropout masks (bool, (B, H, L, V) and (B, H, V, L)), if given, replace random dropout."""
    lang_ctx = _attend_ref(lang_q, visn_k, visn_v, visn_mask, dropout_p, lang_dropout_mask)
    visn_ctx = _attend_ref(visn_q, lang_k, lang_v, lang_mask, dropout_p, visn_dropout_mask)
    return lang_ctx, visn_ctx


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b in fp32. "upcast": multiply in fp32 (Triton 3.9's interpreter returns garbage for bf16 tl.dot)."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _probs(q, k, key_ok, scale, DOT_PRECISION: tl.constexpr):
    """Row softmax of q k^T * scale over the keys where key_ok; all-masked rows give zeros. fp32 (BLOCK_Q, BLOCK_K)."""
    s = _mm(q, tl.trans(k), DOT_PRECISION) * scale
    s = tl.where(key_ok[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    e = tl.exp(s - row_max[:, None])  # exactly 0 at masked keys
    denom = tl.sum(e, axis=1)
    return e / tl.where(denom == 0.0, 1.0, denom)[:, None]


@triton.jit
def _load_tile(Ptr, b, h, stride_b, stride_h, stride_l, n, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK, BLOCK_D) tile of head (b, h) of a (B, H, n, D) tensor with unit last stride; zeros outside."""
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    ptrs = Ptr + b * stride_b + h * stride_h + rows[:, None] * stride_l + dims[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < n) & (dims[None, :] < D), other=0.0)


@triton.jit
def _load_qkv(Q, K, V, b, h, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, Lq, Lk, D,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head (b, h)'s query (BLOCK_Q, BLOCK_D), key and value (BLOCK_K, BLOCK_D) tiles."""
    q = _load_tile(Q, b, h, sq_b, sq_h, sq_l, Lq, D, BLOCK_Q, BLOCK_D)
    k = _load_tile(K, b, h, sk_b, sk_h, sk_l, Lk, D, BLOCK_K, BLOCK_D)
    v = _load_tile(V, b, h, sv_b, sv_h, sv_l, Lk, D, BLOCK_K, BLOCK_D)
    return q, k, v


@triton.jit
def _store_tile(Ptr, val, b, h, H, n, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store into a (B, H, n, D) view of (B, n, H, D) contiguous storage (the layout outputs and gradients use)."""
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    ptrs = Ptr + b * n * H * D + h * D + rows[:, None] * H * D + dims[None, :]
    tl.store(ptrs, val.to(Ptr.dtype.element_ty), mask=(rows[:, None] < n) & (dims[None, :] < D))


@triton.jit
def _key_mask(KeyMask, b, stride_mb, Lk, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K,) bool: key index < Lk and, with a mask, mask[b, key] != 0."""
    keys = tl.arange(0, BLOCK_K)
    ok = keys < Lk
    if HAS_MASK:
        ok = ok & (tl.load(KeyMask + b * stride_mb + keys, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _dropout_keep(Seed, tile_id, dropout_p, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, TILE: tl.constexpr):
    """Philox keep-mask of one (BLOCK_Q, BLOCK_K) tile; TILE spaces the tiles' counters apart."""
    offs = tile_id * TILE + tl.arange(0, BLOCK_Q)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    return tl.rand(tl.load(Seed), offs) >= dropout_p


@triton.jit
def _attend_fwd(
    Q, K, V, KeyMask, Out,  # this direction's query, key, value, key mask, output
    b, h, H, Lq, Lk, D,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b,  # input strides (batch, head, token)
    scale, dropout_p, Seed, tile_id,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    q, k, v = _load_qkv(Q, K, V, b, h, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, Lq, Lk, D,
                        BLOCK_Q, BLOCK_K, BLOCK_D)
    p = _probs(q, k, _key_mask(KeyMask, b, sm_b, Lk, HAS_MASK, BLOCK_K), scale, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(Seed, tile_id, dropout_p, BLOCK_Q, BLOCK_K, TILE)
        p = tl.where(keep, p * dropout_scale(dropout_p), 0.0)
    o = _mm(p.to(v.dtype), v, DOT_PRECISION)  # (BLOCK_Q, BLOCK_D) fp32
    _store_tile(Out, o, b, h, H, Lq, D, BLOCK_Q, BLOCK_D)


@triton.jit
def _cross_attn_fwd_kernel(
    LQ, LK, LV,  # (B, H, L, D) language query, key, value
    VQ, VK, VV,  # (B, H, V, D) vision query, key, value
    LMask, VMask,  # (B, L), (B, V) bool key masks (1 = real token); unused without HAS_*MASK
    LO, VO,  # outputs: (B, H, L, D) and (B, H, V, D) views of (B, L, H, D) / (B, V, H, D) storage
    slq_b, slq_h, slq_l, slk_b, slk_h, slk_l, slv_b, slv_h, slv_l,  # language strides
    svq_b, svq_h, svq_l, svk_b, svk_h, svk_l, svv_b, svv_h, svv_l,  # vision strides
    slm_b, svm_b,  # mask batch strides
    H, L, V, D,
    scale,  # 1 / sqrt(D)
    dropout_p, Seed,  # drop probability, (1,) int64 Philox seed (read only if HAS_DROPOUT)
    HAS_LMASK: tl.constexpr, HAS_VMASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    direction = tl.program_id(1)  # 0: language queries -> vision keys; 1: vision queries -> language keys
    b = bh // H
    h = bh % H
    tile_id = bh * 2 + direction
    if direction == 0:
        _attend_fwd(
            LQ, VK, VV, VMask, LO, b, h, H, L, V, D,
            slq_b, slq_h, slq_l, svk_b, svk_h, svk_l, svv_b, svv_h, svv_l, svm_b,
            scale, dropout_p, Seed, tile_id,
            HAS_VMASK, HAS_DROPOUT, DOT_PRECISION, BLOCK_L, BLOCK_V, BLOCK_D, BLOCK_L * BLOCK_V,
        )
    else:
        _attend_fwd(
            VQ, LK, LV, LMask, VO, b, h, H, V, L, D,
            svq_b, svq_h, svq_l, slk_b, slk_h, slk_l, slv_b, slv_h, slv_l, slm_b,
            scale, dropout_p, Seed, tile_id,
            HAS_LMASK, HAS_DROPOUT, DOT_PRECISION, BLOCK_V, BLOCK_L, BLOCK_D, BLOCK_L * BLOCK_V,
        )


@triton.jit
def _attend_bwd(
    Q, K, V, KeyMask, DO, DQ, DK, DV,  # this direction's inputs, output gradient, input gradients
    b, h, H, Lq, Lk, D,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, so_b, so_h, so_l,
    scale, dropout_p, Seed, tile_id,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    q, k, v = _load_qkv(Q, K, V, b, h, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, Lq, Lk, D,
                        BLOCK_Q, BLOCK_K, BLOCK_D)
    do = _load_tile(DO, b, h, so_b, so_h, so_l, Lq, D, BLOCK_Q, BLOCK_D)  # (BLOCK_Q, BLOCK_D)
    p = _probs(q, k, _key_mask(KeyMask, b, sm_b, Lk, HAS_MASK, BLOCK_K), scale, DOT_PRECISION)  # (BLOCK_Q, BLOCK_K)
    dp = _mm(do, tl.trans(v), DOT_PRECISION)  # d(dropped probs), (BLOCK_Q, BLOCK_K)
    if HAS_DROPOUT:
        keep = _dropout_keep(Seed, tile_id, dropout_p, BLOCK_Q, BLOCK_K, TILE)
        pd = tl.where(keep, p * dropout_scale(dropout_p), 0.0)
        dp = tl.where(keep, dp * dropout_scale(dropout_p), 0.0)
    else:
        pd = p
    dv = _mm(tl.trans(pd.to(do.dtype)), do, DOT_PRECISION)  # (BLOCK_K, BLOCK_D)
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # (BLOCK_Q, BLOCK_K), zero at masked keys
    dq = _mm(ds.to(k.dtype), k, DOT_PRECISION) * scale
    dk = _mm(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION) * scale
    _store_tile(DQ, dq, b, h, H, Lq, D, BLOCK_Q, BLOCK_D)
    _store_tile(DK, dk, b, h, H, Lk, D, BLOCK_K, BLOCK_D)
    _store_tile(DV, dv, b, h, H, Lk, D, BLOCK_K, BLOCK_D)


@triton.jit
def _cross_attn_bwd_kernel(
    LQ, LK, LV, VQ, VK, VV, LMask, VMask,  # forward inputs, as in _cross_attn_fwd_kernel
    DLO, DVO,  # (B, H, L, D), (B, H, V, D) gradients of the two contexts
    DLQ, DLK, DLV, DVQ, DVK, DVV,  # input gradients, (B, *, H, D) storage
    slq_b, slq_h, slq_l, slk_b, slk_h, slk_l, slv_b, slv_h, slv_l,
    svq_b, svq_h, svq_l, svk_b, svk_h, svk_l, svv_b, svv_h, svv_l,
    slm_b, svm_b,
    slo_b, slo_h, slo_l, svo_b, svo_h, svo_l,  # context-gradient strides
    H, L, V, D,
    scale, dropout_p, Seed,
    HAS_LMASK: tl.constexpr, HAS_VMASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    direction = tl.program_id(1)
    b = bh // H
    h = bh % H
    tile_id = bh * 2 + direction
    if direction == 0:
        _attend_bwd(
            LQ, VK, VV, VMask, DLO, DLQ, DVK, DVV, b, h, H, L, V, D,
            slq_b, slq_h, slq_l, svk_b, svk_h, svk_l, svv_b, svv_h, svv_l, svm_b, slo_b, slo_h, slo_l,
            scale, dropout_p, Seed, tile_id,
            HAS_VMASK, HAS_DROPOUT, DOT_PRECISION, BLOCK_L, BLOCK_V, BLOCK_D, BLOCK_L * BLOCK_V,
        )
    else:
        _attend_bwd(
            VQ, LK, LV, LMask, DVO, DVQ, DLK, DLV, b, h, H, V, L, D,
            svq_b, svq_h, svq_l, slk_b, slk_h, slk_l, slv_b, slv_h, slv_l, slm_b, svo_b, svo_h, svo_l,
            scale, dropout_p, Seed, tile_id,
            HAS_LMASK, HAS_DROPOUT, DOT_PRECISION, BLOCK_V, BLOCK_L, BLOCK_D, BLOCK_L * BLOCK_V,
        )


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_arg(mask, like):
    """(mask, has_mask): bool masks go to the kernel as they are; without a mask any tensor fills the slot."""
    if mask is None:
        return like, False
    return mask.to(torch.bool).contiguous(), True


def _seq_major(b, h, n, d, like):
    """A (B, H, n, D) tensor whose storage is (B, n, H, D): the layout _store_tile writes."""
    return torch.empty(b, n, h, d, device=like.device, dtype=like.dtype).transpose(1, 2)


def _launch_meta(lang_q, visn_q, dropout_p, backward=False):
    b, h, length_l, d = lang_q.shape
    length_v = visn_q.shape[2]
    blocks = dict(BLOCK_L=block_size(length_l, 16), BLOCK_V=block_size(length_v, 16), BLOCK_D=block_size(d, 16))
    if lang_q.dtype == torch.float32:
        precision = "ieee"  # exact fp32 products, as PyTorch's default (no TF32)
    elif lang_q.dtype == torch.bfloat16 and interpreted():
        precision = "upcast"  # work around the interpreter's bf16 dot (compiled kernels use bf16 tensor cores)
    else:
        precision = "tf32"  # ignored by Triton for fp16/bf16 operands
    big = max(blocks["BLOCK_L"], blocks["BLOCK_V"]) * blocks["BLOCK_D"] >= 128 * 64
    warps = 8 if big else 4
    if lang_q.dtype == torch.float32:
        # fp32 tiles (no tensor cores) need twice the registers, backward's five products more again. Compiled for
        # an H100 at LXMERT's shapes, 4 warps spilled registers (fwd 136 bytes per thread; bwd 1.4 KB, and 94 KB
        # with dropout); these counts spill none, or under 200 bytes in backward (16 warps is the most that helps:
        # 32 cap a thread at 64 registers). `python benchmarks/kernel_resources.py` shows it without a GPU.
        warps = min(16, warps * (4 if backward else 2))
    return b, h, length_l, length_v, d, dict(
        **blocks, HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=precision, num_warps=warps
    )


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def _cross_attention_fwd_impl(
    wrap, lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask, dropout_p, seed
):
    b, h, length_l, length_v, d, meta = _launch_meta(lang_q, visn_q, dropout_p)
    lmask, has_lmask = _mask_arg(lang_mask, lang_q)
    vmask, has_vmask = _mask_arg(visn_mask, lang_q)
    lang_ctx = _seq_major(b, h, length_l, d, lang_q)
    visn_ctx = _seq_major(b, h, length_v, d, lang_q)
    wrap(_cross_attn_fwd_kernel)[(b * h, 2)](
        lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lmask, vmask, lang_ctx, visn_ctx,
        *_strides(lang_q, lang_k, lang_v, visn_q, visn_k, visn_v), lmask.stride(0), vmask.stride(0),
        h, length_l, length_v, d, 1.0 / math.sqrt(d), dropout_p, seed_slot(seed, lang_q),
        HAS_LMASK=has_lmask, HAS_VMASK=has_vmask, **meta,
    )
    return lang_ctx, visn_ctx


@triton_op("lxmert_fast::bidirectional_cross_attention_fwd", mutates_args=())
def _cross_attention_fwd(
    lang_q: torch.Tensor, lang_k: torch.Tensor, lang_v: torch.Tensor,
    visn_q: torch.Tensor, visn_k: torch.Tensor, visn_v: torch.Tensor,
    lang_mask: torch.Tensor | None, visn_mask: torch.Tensor | None, dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _cross_attention_fwd_impl(
        wrap_triton, lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask, dropout_p, seed
    )


def _cross_attention_bwd_impl(
    wrap, d_lang_ctx, d_visn_ctx, lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask, dropout_p,
    seed,
):
    b, h, length_l, length_v, d, meta = _launch_meta(lang_q, visn_q, dropout_p, backward=True)
    lmask, has_lmask = _mask_arg(lang_mask, lang_q)
    vmask, has_vmask = _mask_arg(visn_mask, lang_q)
    grads = [_seq_major(b, h, length_l, d, lang_q) for _ in range(3)]
    grads += [_seq_major(b, h, length_v, d, lang_q) for _ in range(3)]
    d_lang_ctx, d_visn_ctx = _unit_last(d_lang_ctx), _unit_last(d_visn_ctx)
    wrap(_cross_attn_bwd_kernel)[(b * h, 2)](
        lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lmask, vmask, d_lang_ctx, d_visn_ctx, *grads,
        *_strides(lang_q, lang_k, lang_v, visn_q, visn_k, visn_v), lmask.stride(0), vmask.stride(0),
        *_strides(d_lang_ctx, d_visn_ctx),
        h, length_l, length_v, d, 1.0 / math.sqrt(d), dropout_p, seed_slot(seed, lang_q),
        HAS_LMASK=has_lmask, HAS_VMASK=has_vmask, **meta,
    )
    return tuple(grads)


@triton_op("lxmert_fast::bidirectional_cross_attention_bwd", mutates_args=())
def _cross_attention_bwd(
    d_lang_ctx: torch.Tensor, d_visn_ctx: torch.Tensor,
    lang_q: torch.Tensor, lang_k: torch.Tensor, lang_v: torch.Tensor,
    visn_q: torch.Tensor, visn_k: torch.Tensor, visn_v: torch.Tensor,
    lang_mask: torch.Tensor | None, visn_mask: torch.Tensor | None, dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cross_attention_bwd_impl(
        wrap_triton, d_lang_ctx, d_visn_ctx, lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask,
        dropout_p, seed,
    )


class _BidirectionalCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask, dropout_p, seed):
        inputs = [_unit_last(t) for t in (lang_q, lang_k, lang_v, visn_q, visn_k, visn_v)]
        fwd = pick(torch.ops.lxmert_fast.bidirectional_cross_attention_fwd, _cross_attention_fwd_impl)
        lang_ctx, visn_ctx = fwd(*inputs, lang_mask, visn_mask, dropout_p, seed)
        ctx.save_for_backward(*inputs, lang_mask, visn_mask, seed)
        ctx.dropout_p = dropout_p
        return lang_ctx, visn_ctx

    @staticmethod
    def backward(ctx, d_lang_ctx, d_visn_ctx):
        *inputs, lang_mask, visn_mask, seed = ctx.saved_tensors
        grads = pick(torch.ops.lxmert_fast.bidirectional_cross_attention_bwd, _cross_attention_bwd_impl)(
            d_lang_ctx, d_visn_ctx, *inputs, lang_mask, visn_mask, ctx.dropout_p, seed
        )
        return (*grads, None, None, None, None)


def _check(lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask):
    b, h, length_l, d = lang_q.shape
    length_v = visn_q.shape[2]
    for name, t, n in (("lang_k", lang_k, length_l), ("lang_v", lang_v, length_l), ("visn_q", visn_q, length_v),
                       ("visn_k", visn_k, length_v), ("visn_v", visn_v, length_v)):
        if t.shape != (b, h, n, d) or t.dtype != lang_q.dtype or t.device != lang_q.device:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}, expected {(b, h, n, d)} {lang_q.dtype}")
    for name, m, n in (("lang_mask", lang_mask, length_l), ("visn_mask", visn_mask, length_v)):
        if m is not None and m.shape != (b, n):
            raise ValueError(f"{name} is {tuple(m.shape)}, expected {(b, n)}")
    if max(length_l, length_v) > MAX_LEN or d > MAX_HEAD_DIM:
        raise ValueError(
            f"bidirectional_cross_attention holds a whole head in one tile: lengths up to {MAX_LEN} and head dim up "
            f"to {MAX_HEAD_DIM}, got L={length_l}, V={length_v}, D={d}"
        )
    if b * h * 2 * block_size(length_l, 16) * block_size(length_v, 16) >= 2**31:
        raise ValueError("too many heads for the int32 dropout counter")


def bidirectional_cross_attention(
    lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask, dropout_p=0.0, seed=None
):
    """(lang_ctx, visn_ctx) of LXMERT's cross-attention, both directions in one launch.

    q/k/v: (B, H, L, D) language and (B, H, V, D) vision, one dtype; masks: bool (B, L) / (B, V), True = real token,
    or None. ``dropout_p`` is applied to the attention probabilities as given (pass 0.0 in eval); ``seed`` (int) fixes
    the dropout mask, None draws one with torch's generator of the inputs' device (fresh at each CUDA-graph
    replay). Queries with no unmasked key get zeros.
    """
    _check(lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    seed_tensor = dropout_seed(seed, lang_q.device) if dropout_p > 0 else None
    return _BidirectionalCrossAttention.apply(
        lang_q, lang_k, lang_v, visn_q, visn_k, visn_v, lang_mask, visn_mask, dropout_p, seed_tensor
    )
