"""bidirectional_cross_attention against bidirectional_cross_attention_ref: outputs, all six gradients, masks, dropout.

Each case is checked against an fp32 reference: the kernel's error may be at most 2x PyTorch's own error in the same
dtype, plus (atol + rtol * max |ref|). Without CUDA the kernels run under Triton's interpreter, so shapes stay tiny;
the LXMERT shapes (B=256, 12 heads, 20 words, 36 objects, head dim 64) run only on a GPU.
"""

import pytest
import torch
from kernel_checks import CUDA, DEVICE, DTYPES, assert_within_torch_error, gpu_only
from lxmert_fast.kernels.ops import bidirectional_cross_attention, bidirectional_cross_attention_ref

# (B, H, L, V, D): batch 1, odd and prime lengths, head dims that are not powers of two.
SHAPES = [(1, 1, 3, 5, 8), (2, 3, 7, 5, 12), (1, 2, 17, 9, 20)]
GPU_SHAPES = [pytest.param(s, marks=gpu_only) for s in [(256, 12, 20, 36, 64), (3, 2, 33, 47, 40)]]
NAMES = ["lang_ctx", "visn_ctx", "d_lang_q", "d_lang_k", "d_lang_v", "d_visn_q", "d_visn_k", "d_visn_v"]


def make_inputs(shape, masked=True, seed=0):
    b, h, length_l, length_v, d = shape
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(b, h, n, d, generator=g) for n in (length_l,) * 3 + (length_v,) * 3]
    douts = [torch.randn(b, h, n, d, generator=g) for n in (length_l, length_v)]
    lang_mask = visn_mask = None
    if masked:
        lang_mask = torch.rand(b, length_l, generator=g) > 0.3
        visn_mask = torch.rand(b, length_v, generator=g) > 0.3
        lang_mask[:, 0] = visn_mask[:, 0] = True  # keep one real token per sample ...
        lang_mask[-1] = False  # ... except the last sample's language: its vision queries have no key at all
    to = lambda t: None if t is None else t.to(DEVICE)
    return [to(t) for t in qkv], to(lang_mask), to(visn_mask), [to(t) for t in douts]


def outputs_and_grads(fn, qkv, lang_mask, visn_mask, douts):
    leaves = [t.detach().clone().requires_grad_() for t in qkv]
    outs = fn(*leaves, lang_mask, visn_mask)
    grads = torch.autograd.grad(outs, leaves, [d.to(outs[0].dtype) for d in douts])
    return [*outs, *grads]




def check(shape, dtype, atol, rtol, masked=True, fn=bidirectional_cross_attention,
          ref=bidirectional_cross_attention_ref, transform=lambda t: t):
    qkv, lang_mask, visn_mask, douts = make_inputs(shape, masked)
    fp32 = outputs_and_grads(ref, [transform(t) for t in qkv], lang_mask, visn_mask, douts)
    low = [transform(t.to(dtype)) for t in qkv]
    same_dtype = outputs_and_grads(ref, low, lang_mask, visn_mask, douts)
    got = outputs_and_grads(fn, low, lang_mask, visn_mask, douts)
    assert_within_torch_error(NAMES, got, same_dtype, fp32, atol, rtol)
    return got


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + GPU_SHAPES)
def test_matches_reference(shape, dtype, atol, rtol):
    check(shape, dtype, atol, rtol)


@gpu_only
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[1:])
def test_longest_supported_lengths(dtype, atol, rtol):
    # Half precision only: fp32 tiles of 128 x 128 compile very slowly (about 95 s on an H100 host).
    check((8, 12, 128, 100, 64), dtype, atol, rtol)


def test_without_masks():
    check((2, 2, 5, 7, 16), torch.float32, 1e-5, 1e-5, masked=False)


def test_fully_masked_rows_give_zeros_not_nan():
    b, h, length_l, length_v, d = 2, 2, 5, 7, 8
    qkv, _, _, douts = make_inputs((b, h, length_l, length_v, d), masked=False)
    lang_mask = torch.ones(b, length_l, dtype=torch.bool, device=DEVICE)
    visn_mask = torch.ones(b, length_v, dtype=torch.bool, device=DEVICE)
    visn_mask[0] = False  # sample 0's language queries see no vision key
    lang_ctx, visn_ctx, d_lang_q, *rest = outputs_and_grads(
        bidirectional_cross_attention, qkv, lang_mask, visn_mask, douts
    )
    for t in (lang_ctx, visn_ctx, d_lang_q, *rest):
        assert not torch.isnan(t).any()
    assert torch.equal(lang_ctx[0], torch.zeros_like(lang_ctx[0]))
    assert torch.equal(d_lang_q[0], torch.zeros_like(d_lang_q[0]))
    assert lang_ctx[1].abs().sum() > 0
    # Masked keys get exactly zero weight: changing a masked key/value changes nothing.
    visn_mask[1, -1] = False
    before = bidirectional_cross_attention(*qkv, lang_mask, visn_mask)[0]
    qkv[4][1, :, -1] += 100.0  # visn_k of the masked object
    qkv[5][1, :, -1] += 100.0  # visn_v of the masked object
    assert torch.equal(before, bidirectional_cross_attention(*qkv, lang_mask, visn_mask)[0])


def test_non_contiguous_head_views():
    # The model's layout: q = linear_out.view(B, L, H, D).transpose(1, 2): (B, H, L, D) with (B, L, H, D) strides.
    def heads_view(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    qkv, *_ = make_inputs((2, 3, 5, 7, 12))
    assert not heads_view(qkv[0]).is_contiguous()
    got = check((2, 3, 5, 7, 12), torch.float32, 1e-5, 1e-5, transform=heads_view)
    # Outputs come back in the same (B, L, H, D) storage, so merging heads is a free view.
    assert got[0].transpose(1, 2).is_contiguous() and got[1].transpose(1, 2).is_contiguous()
    # A last dim that is not unit-stride is copied, not misread.
    check((1, 2, 3, 5, 8), torch.float32, 1e-5, 1e-5, transform=lambda t: t.mT.contiguous().mT)


def dropout_masks(shape, p, seed):
    """The kernel's dropout masks, read off by attending to one-hot values: ctx[..., i, j] = dropped probs[i, j]."""
    b, h, length_l, length_v, d = shape
    assert d >= max(length_l, length_v)
    qkv, *_ = make_inputs(shape, masked=False)
    qkv[2] = torch.eye(length_l, d, device=DEVICE).expand(b, h, length_l, d)  # lang_v
    qkv[5] = torch.eye(length_v, d, device=DEVICE).expand(b, h, length_v, d)  # visn_v
    lang_ctx, visn_ctx = bidirectional_cross_attention(*qkv, None, None, dropout_p=p, seed=seed)
    return lang_ctx[..., :length_v] != 0, visn_ctx[..., :length_l] != 0  # (B, H, L, V), (B, H, V, L)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction_and_gradients(p):
    shape = (2, 3, 5, 7, 8)
    lang_drop, visn_drop = dropout_masks(shape, p, seed=11)
    n = lang_drop.numel() + visn_drop.numel()
    dropped = 1.0 - (lang_drop.sum() + visn_drop.sum()).item() / n
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5, f"dropped {dropped:.3f}, expected {p}"
    # Same seed, other inputs and masks: the same dropout pattern, in forward and regenerated in backward.
    fn = lambda *a: bidirectional_cross_attention(*a, dropout_p=p, seed=11)
    ref = lambda *a: bidirectional_cross_attention_ref(
        *a, dropout_p=p, lang_dropout_mask=lang_drop, visn_dropout_mask=visn_drop
    )
    check(shape, torch.float32, 1e-5, 1e-5, fn=fn, ref=ref)


def test_dropout_seed_reproduces_and_varies():
    shape = (1, 2, 5, 7, 8)
    assert all(torch.equal(a, b) for a, b in zip(dropout_masks(shape, 0.3, 1), dropout_masks(shape, 0.3, 1),
                                                 strict=True))
    assert not torch.equal(dropout_masks(shape, 0.3, 1)[0], dropout_masks(shape, 0.3, 2)[0])


def test_rejects_unsupported_sizes():
    qkv, *_ = make_inputs((1, 1, 3, 129, 8), masked=False)
    with pytest.raises(ValueError, match="one tile"):
        bidirectional_cross_attention(*qkv, None, None)
    qkv, *_ = make_inputs((1, 1, 3, 5, 8), masked=False)
    with pytest.raises(ValueError, match="visn_k"):
        bidirectional_cross_attention(*qkv[:4], qkv[4][..., :4], qkv[5], None, None)


def test_registered_ops_match_eager_path():
    # torch.compile sees the registered custom ops; eager calls launch the same kernels directly.
    qkv, lang_mask, visn_mask, douts = make_inputs((1, 2, 5, 7, 8))
    fwd_args = (*qkv, lang_mask, visn_mask, 0.2, torch.tensor([5], device=DEVICE))
    outs = torch.ops.lxmert_fast.bidirectional_cross_attention_fwd(*fwd_args)
    fn = lambda *a: bidirectional_cross_attention(*a, dropout_p=0.2, seed=5)
    got = outputs_and_grads(fn, qkv, lang_mask, visn_mask, douts)
    bwd_args = (*douts, *fwd_args)
    for name, g, want in zip(NAMES, [*outs, *torch.ops.lxmert_fast.bidirectional_cross_attention_bwd(*bwd_args)],
                             got, strict=True):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-6, msg=name)
    if CUDA:  # fake-tensor tracing of the ops needs compiled kernels (the CPU interpreter cannot run on "meta")
        torch.library.opcheck(torch.ops.lxmert_fast.bidirectional_cross_attention_fwd.default, fwd_args)
        torch.library.opcheck(torch.ops.lxmert_fast.bidirectional_cross_attention_bwd.default, bwd_args)


@gpu_only
def test_torch_compile_forward_and_backward():
    qkv, lang_mask, visn_mask, douts = make_inputs((16, 12, 20, 36, 64))
    compiled = torch.compile(bidirectional_cross_attention, fullgraph=True)
    got = outputs_and_grads(compiled, qkv, lang_mask, visn_mask, douts)
    want = outputs_and_grads(bidirectional_cross_attention_ref, qkv, lang_mask, visn_mask, douts)
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


@gpu_only
def test_torch_compile_with_dropout_equals_eager():
    qkv, lang_mask, visn_mask, douts = make_inputs((16, 12, 20, 36, 64))
    fn = lambda *a: bidirectional_cross_attention(*a, dropout_p=0.1, seed=7)  # noqa: E731
    got = outputs_and_grads(torch.compile(fn, fullgraph=True), qkv, lang_mask, visn_mask, douts)
    want = outputs_and_grads(fn, qkv, lang_mask, visn_mask, douts)
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)
