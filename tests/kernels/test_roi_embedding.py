"""roi_position_embedding against roi_position_embedding_ref: output and the gradients of all ten inputs.

Each case is checked against an fp32 reference: the kernel's error may be at most 2x PyTorch's own error in the same
dtype, plus (atol + rtol * max |ref|). Without CUDA the kernels run under Triton's interpreter, so shapes stay tiny;
the LXMERT shape (256 images x 36 objects, 2048-d features, hidden 768) runs only on a GPU.
"""

import pytest
import torch
from kernel_checks import CUDA, DEVICE, DTYPES, assert_within_torch_error, gpu_only
from lxmert_fast.kernels.ops import roi_position_embedding, roi_position_embedding_ref

# (batch, objects, feature dim, hidden): batch 1, odd object counts, hidden sizes that are not powers of two.
SHAPES = [(1, 1, 8, 48), (2, 7, 24, 100), (1, 5, 16, 768)]
GPU_SHAPES = [pytest.param(s, marks=gpu_only) for s in [(256, 36, 2048, 768), (3, 37, 2048, 1000)]]
NAMES = ["y", "d_feats", "d_boxes", "d_feat_weight", "d_feat_bias", "d_feat_ln_weight", "d_feat_ln_bias",
         "d_box_weight", "d_box_bias", "d_box_ln_weight", "d_box_ln_bias"]


def make_inputs(shape, seed=0):
    b, v, f, n = shape
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, v, f, generator=g).relu()  # RoI features are post-ReLU
    boxes = torch.rand(b, v, 4, generator=g)  # normalised x1, y1, x2, y2
    params = [
        torch.randn(n, f, generator=g) / f**0.5, 0.1 * torch.randn(n, generator=g),  # visn_fc
        1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g),  # visn_layer_norm
        torch.randn(n, 4, generator=g), 0.1 * torch.randn(n, generator=g),  # box_fc
        1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g),  # box_layer_norm
    ]
    dy = torch.randn(b, v, n, generator=g)
    return [t.to(DEVICE) for t in (feats, boxes, *params)], dy.to(DEVICE)


def outputs_and_grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]




def check(shape, dtype, atol, rtol, transform=lambda t: t):
    tensors, dy = make_inputs(shape)
    fp32 = outputs_and_grads(roi_position_embedding_ref, [transform(t) for t in tensors], dy)
    low = [transform(t.to(dtype)) for t in tensors]
    same_dtype = outputs_and_grads(roi_position_embedding_ref, low, dy)
    got = outputs_and_grads(roi_position_embedding, low, dy)
    assert_within_torch_error(NAMES, got, same_dtype, fp32, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + GPU_SHAPES)
def test_matches_reference(shape, dtype, atol, rtol):
    check(shape, dtype, atol, rtol)


def test_non_contiguous_inputs():
    # feats, boxes and the box weight as transposed views (the box weight's columns are then not unit-stride).
    def transposed(t):
        return t.mT.contiguous().mT if t.dim() >= 2 else t

    tensors, _ = make_inputs((2, 5, 8, 48))
    assert not transposed(tensors[1]).is_contiguous()
    check((2, 5, 8, 48), torch.float32, 1e-5, 1e-5, transform=transposed)


def test_rejects_mismatched_shapes():
    tensors, _ = make_inputs((1, 3, 8, 48))
    tensors[1], tensors[6] = tensors[1][..., :3], tensors[6][:, :3]  # 3 box coordinates: the kernel needs 4
    with pytest.raises(ValueError, match="4 box coordinates"):
        roi_position_embedding(*tensors)
    tensors, _ = make_inputs((1, 3, 8, 48))
    tensors[1] = tensors[1][..., :3]
    with pytest.raises(ValueError, match="do not fit"):
        roi_position_embedding(*tensors)


def test_registered_ops_match_eager_path():
    # torch.compile sees the registered custom ops; eager calls launch the same kernels directly.
    tensors, dy = make_inputs((1, 5, 8, 48))
    feats, boxes, fw, fb, fg, fbeta, bw, bb, bg, bbeta = tensors
    a = torch.nn.functional.linear(feats, fw, fb).view(-1, 48)
    fwd_args = (a, boxes.view(-1, 4), fg, fbeta, bw.t().contiguous(), bb, bg, bbeta, 1e-12)  # box weight as (4, N)
    y, *stats = torch.ops.lxmert_fast.roi_position_embedding_fwd(*fwd_args)
    got = outputs_and_grads(roi_position_embedding, tensors, dy)
    assert torch.equal(y.view(got[0].shape), got[0])
    bwd_args = (dy.view(-1, 48), a, boxes.view(-1, 4), fg, fwd_args[4], bb, bg, *stats)
    da, dboxes, dfg, dbeta, dbw, dbb, dbg = torch.ops.lxmert_fast.roi_position_embedding_bwd(*bwd_args)
    for name, g, want in [("d_boxes", dboxes.view(boxes.shape), got[2]), ("d_feat_ln_weight", dfg, got[5]),
                          ("d_box_weight", dbw, got[7]), ("d_box_ln_bias", dbeta, got[10])]:
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-6, msg=name)
    if CUDA:  # fake-tensor tracing of the ops needs compiled kernels (the CPU interpreter cannot run on "meta")
        torch.library.opcheck(torch.ops.lxmert_fast.roi_position_embedding_fwd.default, fwd_args)
        torch.library.opcheck(torch.ops.lxmert_fast.roi_position_embedding_bwd.default, bwd_args)


@gpu_only
def test_torch_compile_forward_and_backward():
    tensors, dy = make_inputs((32, 36, 2048, 768))
    got = outputs_and_grads(torch.compile(roi_position_embedding, fullgraph=True), tensors, dy)
    for name, g, want in zip(NAMES, got, outputs_and_grads(roi_position_embedding_ref, tensors, dy), strict=True):
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4, msg=name)
