"""add_layernorm (dropout + residual add + LayerNorm) against add_layernorm_ref: outputs, every gradient, dropout.

Each case is checked against an fp32 reference: the kernel's error may be at most 2x PyTorch's own error in the same
dtype, plus (atol + rtol * max |ref|). Without CUDA the kernels run under Triton's interpreter, so shapes stay tiny;
the LXMERT shapes run only on a GPU.
"""

import pytest
import torch
from kernel_checks import CUDA, DEVICE, DTYPES, assert_within_torch_error, gpu_only
from lxmert_fast.kernels.ops import add_layernorm, add_layernorm_dropout_mask, add_layernorm_ref

SHAPES = [(1, 1, 48), (1, 7, 100), (3, 5, 31), (2, 3, 768)]  # batch 1, odd lengths, prime / non-power-of-two hidden
GPU_SHAPES = [pytest.param(s, marks=gpu_only) for s in [(256, 20, 768), (256, 36, 768), (37, 11, 1000)]]
NAMES = ["y", "dx", "dresidual", "dweight", "dbias"]


def make_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g)
    residual = torch.randn(shape, generator=g)
    weight = 1.0 + 0.1 * torch.randn(n, generator=g)
    bias = 0.1 * torch.randn(n, generator=g)
    dy = torch.randn(shape, generator=g)
    return [t.to(DEVICE) for t in (x, residual, weight, bias)], dy.to(DEVICE)


def outputs_and_grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]




def check(shape, dtype, atol, rtol, fn=add_layernorm, ref=add_layernorm_ref, transform=lambda t: t):
    tensors, dy = make_inputs(shape)
    fp32 = outputs_and_grads(ref, [transform(t) for t in tensors], dy)
    low = [transform(t.to(dtype)) for t in tensors]
    same_dtype = outputs_and_grads(ref, low, dy)
    got = outputs_and_grads(fn, low, dy)
    assert_within_torch_error(NAMES, got, same_dtype, fp32, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + GPU_SHAPES)
def test_matches_reference(shape, dtype, atol, rtol):
    check(shape, dtype, atol, rtol)


def test_non_contiguous_inputs():
    # x and residual as transposed views (hidden strided by rows): the op must not read them as if contiguous.
    def transposed(t):
        return t.mT.contiguous().mT if t.dim() == 2 else t

    (x, _, _, _), _ = make_inputs((9, 40))
    assert not transposed(x).is_contiguous()
    check((9, 40), torch.float32, 1e-5, 1e-5, transform=transposed)


def test_eval_mode_ignores_dropout():
    (x, r, w, b), _ = make_inputs((2, 5, 48))
    y = add_layernorm(x, r, w, b, dropout_p=0.5, training=False)
    torch.testing.assert_close(y, add_layernorm_ref(x, r, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction_and_mask(p):
    shape = (4, 9, 64)
    mask = add_layernorm_dropout_mask(shape, p, seed=123, device=DEVICE)
    n = mask.numel()
    dropped = 1.0 - mask.float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5, f"dropped {dropped:.3f}, expected {p}"
    # The kernel applies exactly that mask, in forward and in backward (dx is zero where dropped).
    fn = lambda x, r, w, b: add_layernorm(x, r, w, b, dropout_p=p, training=True, seed=123)
    ref = lambda x, r, w, b: add_layernorm_ref(x, r, w, b, dropout_p=p, dropout_mask=mask)
    check(shape, torch.float32, 1e-5, 1e-5, fn=fn, ref=ref)


def test_dropout_seed_reproduces_and_varies():
    (x, r, w, b), _ = make_inputs((3, 7, 48))
    run = lambda seed: add_layernorm(x, r, w, b, dropout_p=0.2, training=True, seed=seed)
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    torch.manual_seed(0)
    first = add_layernorm(x, r, w, b, dropout_p=0.2, training=True)
    torch.manual_seed(0)
    assert torch.equal(first, add_layernorm(x, r, w, b, dropout_p=0.2, training=True))


def test_rejects_bad_arguments():
    (x, r, w, b), _ = make_inputs((2, 48))
    with pytest.raises(ValueError, match="dropout_p"):
        add_layernorm(x, r, w, b, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="residual"):
        add_layernorm(x, r[:1], w, b)


def test_registered_ops_match_eager_path():
    # torch.compile sees the registered custom ops; eager calls launch the same kernels directly.
    (x, r, w, b), dy = make_inputs((3, 48))
    seed = torch.tensor([5], device=DEVICE)  # the ops take the seed as a device tensor
    y, mean, rstd = torch.ops.lxmert_fast.add_layernorm_fwd(x, r, w, b, 1e-12, 0.2, seed)
    got = outputs_and_grads(lambda *a: add_layernorm(*a, dropout_p=0.2, training=True, seed=5), [x, r, w, b], dy)
    assert torch.equal(y, got[0])
    bwd_args = (dy, x, r, w, mean, rstd, 0.2, seed)
    for name, g, want in zip(NAMES[1:], torch.ops.lxmert_fast.add_layernorm_bwd(*bwd_args), got[1:], strict=True):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-6, msg=name)
    # without dropout dx is dresidual: the op writes it once and returns an empty dx (outputs may not alias)
    y0, mean0, rstd0 = torch.ops.lxmert_fast.add_layernorm_fwd(x, r, w, b, 1e-12, 0.0, None)
    dx0, dr0, _, _ = torch.ops.lxmert_fast.add_layernorm_bwd(dy, x, r, w, mean0, rstd0, 0.0, None)
    got0 = outputs_and_grads(add_layernorm, [x, r, w, b], dy)
    assert dx0.numel() == 0 and torch.equal(dr0, got0[2]) and torch.equal(got0[1], got0[2])
    if CUDA:  # fake-tensor tracing of the ops needs compiled kernels (the CPU interpreter cannot run on "meta")
        torch.library.opcheck(torch.ops.lxmert_fast.add_layernorm_fwd.default, (x, r, w, b, 1e-12, 0.2, seed))
        torch.library.opcheck(torch.ops.lxmert_fast.add_layernorm_bwd.default, bwd_args)


@gpu_only
def test_torch_compile_forward_and_backward():
    tensors, dy = make_inputs((64, 20, 768))
    got = outputs_and_grads(torch.compile(add_layernorm, fullgraph=True), tensors, dy)
    for name, g, want in zip(NAMES, got, outputs_and_grads(add_layernorm_ref, tensors, dy), strict=True):
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4, msg=name)


@gpu_only
def test_torch_compile_with_dropout_equals_eager():
    # the dropout seed travels as a device tensor: compiled and eager calls with one seed draw the same mask
    tensors, dy = make_inputs((64, 20, 768))
    fn = lambda x, r, w, b: add_layernorm(x, r, w, b, dropout_p=0.1, training=True, seed=7)  # noqa: E731
    got = outputs_and_grads(torch.compile(fn, fullgraph=True), tensors, dy)
    # dweight/dbias: the compiled graph sums the per-program partials in another order
    for name, g, want in zip(NAMES, got, outputs_and_grads(fn, tensors, dy), strict=True):
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4, msg=name)
