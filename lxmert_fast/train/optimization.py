"""Optimisers and learning-rate schedule of LXMERT pre-training.

The released LXMERT was trained with "BertAdam" (the optimiser of the early pytorch-pretrained-bert package): Adam
WITHOUT bias correction and with decoupled weight decay 0.01 applied to EVERY parameter, LayerNorm weights and biases
included. Without bias correction the first steps are tiny (m is still near zero), which the 5% linear warm-up
hides anyway. Clipping is not done here: DeepSpeed clips (``gradient_clipping`` in its JSON), and a plain PyTorch
caller clips before ``step()``.

Both optimisers skip an update on the device, as torch's fused optimisers do for a gradient scaler: while the
tensor ``optimizer.found_inf`` (set by the training loop, lxmert_fast.train.metrics.LossGuard) is nonzero, ``step()``
leaves the weights and the optimiser's moments as they were, without reading the flag back to the host.
"""

import torch


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, decoupled weight decay on all parameters.

    Per element, with g the gradient::

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (sqrt(v) + eps) + weight_decay * p)
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01):
        if lr < 0.0:
            raise ValueError(f"BertAdam: invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"BertAdam: invalid betas {betas}")
        if eps <= 0.0:
            raise ValueError(f"BertAdam: invalid eps {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("BertAdam does not support sparse gradients")
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            found_inf = getattr(self, "found_inf", None)
            gate = None if found_inf is None else _SkipGate(found_inf, group, params[0].device)
            for chunk in _chunks(params, chunk_elements(params[0].device)):
                self._update(chunk, group, gate)
        return loss

    def _update(self, params, group, gate=None):
        # one multi-tensor launch per operation instead of one per parameter (about 470 in LXMERT): the same
        # element-wise arithmetic, in the same order, as the per-parameter formulas in the class docstring
        b1, b2 = group["betas"]
        grads = [p.grad for p in params]
        decay1, decay2 = b1, b2
        if gate is not None:
            gate.zero_gradients_if_skipped(grads)
            decay1, decay2 = gate.b1, gate.b2
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(m, decay1)
        torch._foreach_add_(m, grads, alpha=1.0 - b1)
        torch._foreach_mul_(v, decay2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
        denominator = torch._foreach_sqrt(v)
        torch._foreach_add_(denominator, group["eps"])
        update = torch._foreach_div(m, denominator)
        del denominator
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        if gate is not None:
            torch._foreach_mul_(update, gate.keep)
        torch._foreach_add_(params, update, alpha=-group["lr"])


class _SkipGate:
    """BertAdam's update made a no-op on the device when ``found_inf`` is nonzero, bit for bit, and left exactly as
    without the gate otherwise: the gradients' BITS are multiplied by 0 (a float multiply would keep a NaN), so m
    and v only decay, by factors that become 1; the update, finite then, is multiplied by 0."""

    def __init__(self, found_inf, group, device):
        found = found_inf.to(device, non_blocking=True) != 0  # (a no-op on the flag's own device)
        b1, b2 = group["betas"]
        self.b1, self.b2 = torch.where(found, 1.0, b1), torch.where(found, 1.0, b2)  # float32, as the moments
        self.keep = (~found).float()
        self._keep_bits, self._found = {}, found

    def zero_gradients_if_skipped(self, grads):
        by_size = {}
        for g in grads:
            by_size.setdefault(g.element_size(), []).append(g.view(_SAME_SIZE_INT[g.element_size()]))
        for size, views in by_size.items():
            if size not in self._keep_bits:
                self._keep_bits[size] = (~self._found).to(_SAME_SIZE_INT[size])
            torch._foreach_mul_(views, self._keep_bits[size])


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def chunk_elements(device) -> int:
    """How many elements BertAdam updates per multi-tensor operation. On a GPU, chunks of 16M: ~15 chunks for
    LXMERT instead of 470 parameters, so few launches, and temporaries of 64 MB, not twice the model. On a CPU, one
    parameter at a time, where a larger working set is slower (the base model's step on 2 cores of an EPYC, median
    of 14 interleaved: 1.29 s one parameter at a time, 1.51 s in 16M chunks, 1.91 s all at once; the earlier
    per-parameter code, with one more temporary, 1.62 s)."""
    return 1 << 24 if device.type == "cuda" else 0


def _chunks(params, max_elements):
    chunk, size = [], 0
    for p in params:
        if chunk and size + p.numel() > max_elements:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel()
    if chunk:
        yield chunk


def build_optimizer(params, name="bertadam", lr=1e-4, weight_decay=0.01):
    """``bertadam`` (the released code's optimiser, the default) or ``adamw`` (torch's, with bias correction)."""
    name = name.lower()
    if name == "bertadam":
        return BertAdam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        # fused: the implementation that honours ``found_inf`` (the others refuse it)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=1e-6, fused=True)
    raise ValueError(f"unknown optimizer {name!r}: expected 'bertadam' or 'adamw'")


def warmup_linear(step, total_steps, warmup=0.05):
    """LR multiplier of the ``step``-th update (0-based), as the released code's ``warmup_linear``.

    With x = (step + 1) / total_steps (BertAdam counted updates from 1): x / warmup during the warm-up, then
    (1 - x) / (1 - warmup), falling linearly to 0 at the last update.
    """
    x = (step + 1) / max(int(total_steps), 1)
    if x < warmup:
        return x / warmup
    return max((1.0 - x) / (1.0 - warmup), 0.0)


def build_scheduler(optimizer, total_steps, warmup=0.05):
    """LambdaLR wrapping :func:`warmup_linear`; its state_dict holds only the step, so resume is exact."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_linear(step, total_steps, warmup))
