"""What the kernel tests share: where they run, the dtype axis, and the half-precision error bound."""

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="LXMERT-sized shapes need a GPU (too slow for Triton's interpreter)")

DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-3, 1e-3),
    (torch.bfloat16, 1e-2, 1e-2),
]


def assert_within_torch_error(names, got, same_dtype, fp32, atol, rtol):
    """Each of `got` (ours) is within twice PyTorch's own error in that dtype (`same_dtype`) of the fp32 reference,
    plus atol/rtol slack; same dtype and shape, and finite."""
    for name, g, t, r in zip(names, got, same_dtype, fp32, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.isfinite(g).all(), f"{name} has NaN/inf"
        err = (g.float() - r).abs().max().item()
        torch_err = (t.float() - r).abs().max().item()
        bound = 2 * torch_err + atol + rtol * r.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch's own error {torch_err:.3g})"
