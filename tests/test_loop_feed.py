"""The host side of the training loop: the losses kept on the device (no host-device sync per step) with the
non-finite guard that skips updates on the device, and the loader that feeds the step."""

import pytest
import torch

from lxmert_fast.train.metrics import LossGuard
from lxmert_fast.train.optimization import BertAdam, build_optimizer


def _losses(total, mlm):
    return {"loss": torch.tensor(total), "mlm_loss": torch.tensor(mlm)}


def test_loss_guard_means_match_python_sums_and_flag_sticks():
    guard = LossGuard("cpu")
    steps = [(2.5, 1.25), (2.0, 1.0), (1.75, 0.5)]
    for i, (total, mlm) in enumerate(steps):
        guard.add(_losses(total, mlm), micro_step=i)
    reading = guard.read()
    assert reading.bad_micro_step is None and guard.found_inf.item() == 0
    assert reading.means == {"loss": (0.0 + 2.5 + 2.0 + 1.75) / 3, "mlm_loss": (0.0 + 1.25 + 1.0 + 0.5) / 3}
    guard.reset_means()
    guard.add(_losses(float("nan"), 3.0), micro_step=3)
    guard.add(_losses(float("inf"), 2.0), micro_step=4)  # a later bad step does not replace the first
    guard.add(_losses(1.0, 1.0), micro_step=5)  # the flag stays up
    reading = guard.read()
    assert reading.bad_micro_step == 3 and guard.found_inf.item() == 1
    assert reading.bad_losses["mlm_loss"] == 3.0 and reading.bad_losses["loss"] != reading.bad_losses["loss"]
    assert reading.means == {"loss": 1.0 / 3, "mlm_loss": 6.0 / 3}  # non-finite values count as 0


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(37, 5, generator=g)), torch.nn.Parameter(torch.randn(11, generator=g))]


@pytest.mark.parametrize("name", ["bertadam", "adamw"])
def test_found_inf_skips_the_update_bit_for_bit_and_changes_nothing_otherwise(name):
    plain, gated = _params(), _params()
    opt_plain, opt_gated = build_optimizer(plain, name, lr=1e-2), build_optimizer(gated, name, lr=1e-2)
    opt_gated.found_inf = torch.zeros(())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(plain, gated, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_plain.step()
        opt_gated.step()
    assert all(torch.equal(a, b) for a, b in zip(plain, gated, strict=True))  # the gate open: the same arithmetic
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt_gated.state[p].items() if torch.is_tensor(v)})
              for p in gated]
    for p in gated:
        p.grad = torch.full_like(p, float("nan"))
    opt_gated.found_inf.fill_(1)
    opt_gated.step()
    for p, (weights, state) in zip(gated, before, strict=True):
        assert torch.equal(p, weights)
        for k, v in state.items():
            assert torch.equal(opt_gated.state[p][k], v), k


def test_bertadam_gate_handles_half_precision_gradients():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = BertAdam([p], lr=1e-2)
    opt.found_inf = torch.ones(())
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert torch.equal(p, torch.ones(4, dtype=torch.bfloat16))
