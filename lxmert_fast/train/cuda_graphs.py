"""Whole-step CUDA graphs: record a training step (forward, backward, optimiser) once, replay it for every batch.

At LXMERT's sizes a step is about two thousand small kernels. Launched one by one from Python, the CPU cannot keep
the GPU busy. A replayed graph launches the whole step in one call, so the GPU runs back to back.

What a graphed step needs, all of which lxmert_fast's models and the usage below provide:

- the same shapes for every batch (pre-training batches are padded to a fixed length; use ``drop_last``);
- no host synchronisation inside the step: lxmert_fast's models take fixed row counts for their data-dependent
  parts (``static_shapes=``, lxmert_fast.model.static_shapes), and its kernels draw dropout seeds on the device, so
  every replay gets new masks;
- a capturable optimiser, e.g. ``torch.optim.AdamW(..., fused=True, capturable=True)``; a learning rate that changes
  must be a tensor that the schedule updates in place;
- bf16 or fp32: fp16's GradScaler reads the overflow flag on the host at every step;
- ``torch.autocast(..., cache_enabled=False)`` inside the step (autocast's weight-cast cache must not outlive the
  capture).

Usage::

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss

    graphed = GraphedStep(step, optimizer)
    for batch in loader:
        loss = graphed(batch)  # every call trains on its batch: the first few eagerly, then by replay
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedStep:
    """Runs ``step_fn(batch)`` for each batch: eagerly for ``warmup`` calls, then captured once and replayed.

    Every call is a real step on its own batch (the capturing call replays the graph it just recorded). The
    optimiser's gradients are reset (set to None) before each eager step and before the capture, so replays
    overwrite them rather than accumulate; pass ``optimizer=None`` for a step without one (inference). The
    returned tensors belong to the graph and are overwritten by the next call: ``.item()`` or ``.clone()`` them to
    keep them. A batch that does not fit the captured one (``why_not``) is refused; ``run_eagerly`` takes it.
    """

    def __init__(self, step_fn: Callable, optimizer: torch.optim.Optimizer | None, warmup: int = 3):
        if warmup < 1:
            raise ValueError("GraphedStep needs at least one eager warm-up step before capturing")
        self.step_fn, self.optimizer, self.warmup = step_fn, optimizer, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch = self.static_out = None
        self.calls = 0
        self._side_stream = torch.cuda.Stream()
        self._graph_grads: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> the gradient buffer replays write
        self._stray_grads = False  # an eager step gave gradients to parameters the graph leaves without one

    def __call__(self, batch):
        self.calls += 1
        if self.graph is not None:
            _copy_into(self.static_batch, batch, "batch")
            if self._stray_grads:
                self._restore_graph_grads()
            self.graph.replay()
            return self.static_out
        if self.calls <= self.warmup:
            return self._eager_before_capture(batch)
        self.static_batch = _clone(batch)
        self._zero_grad()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = self.step_fn(self.static_batch)
        self.graph = graph
        self._graph_grads = {p: p.grad for p in self._parameters() if p.grad is not None}
        graph.replay()  # capturing records the step without running it
        return self.static_out

    def why_not(self, batch) -> str | None:
        """What keeps a replay from taking ``batch``: None when there is no graph yet or the batch has the captured
        batch's structure, shapes, dtypes and non-tensor values."""
        return None if self.graph is None else _mismatch(self.static_batch, batch, "batch")

    def run_eagerly(self, batch, step_fn: Callable | None = None):
        """One eager step for a batch the graph was not recorded for (another shape, or one that needs another step
        function, ``step_fn``; default: the captured one), neither counted as a warm-up nor captured. After the
        capture its gradients go into the buffers the graph owns, so whatever reads ``.grad`` next (the
        optimiser) works unchanged; the next replay overwrites them."""
        step_fn = step_fn or self.step_fn
        if self.graph is None:
            return self._eager_before_capture(batch, step_fn)
        self._restore_graph_grads()
        for grad in self._graph_grads.values():
            grad.zero_()
        self._stray_grads = True
        return step_fn(batch)  # backward adds into the existing (zeroed) gradients in place

    def _eager_before_capture(self, batch, step_fn=None):
        # on a side stream, as capture requires: lazy initialisation (cuBLAS handles, autotuning, optimiser state)
        # happens here, not in the graph
        self._side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side_stream):
            self._zero_grad()
            out = (step_fn or self.step_fn)(batch)
        torch.cuda.current_stream().wait_stream(self._side_stream)
        return out

    def _parameters(self):
        if self.optimizer is None:
            return []
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _restore_graph_grads(self):
        """Every parameter's ``.grad`` back to what the graph writes: its buffer, or None."""
        for p in self._parameters():
            p.grad = self._graph_grads.get(p)
        self._stray_grads = False

    def _zero_grad(self):
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _mismatch(static, new, where) -> str | None:
    """Why ``new`` cannot be copied into the captured batch ``static`` (None if it can)."""
    if isinstance(static, torch.Tensor):
        if not isinstance(new, torch.Tensor) or new.shape != static.shape or new.dtype != static.dtype:
            got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
            return (
                f"GraphedStep: {where} is {got}, but the captured step was recorded with {tuple(static.shape)} "
                f"{static.dtype}; a CUDA graph replays fixed shapes (pad batches to one size, drop the last one)"
            )
    elif isinstance(static, dict):
        if not isinstance(new, dict) or new.keys() != static.keys():
            return f"GraphedStep: {where} has keys {sorted(new)}, the captured step had {sorted(static)}"
        for k in static:
            if (why := _mismatch(static[k], new[k], f"{where}[{k!r}]")) is not None:
                return why
    elif isinstance(static, (list, tuple)):
        if not isinstance(new, (list, tuple)) or len(new) != len(static):
            return f"GraphedStep: {where} does not have the captured step's {len(static)} items"
        for i, (s, n) in enumerate(zip(static, new, strict=True)):
            if (why := _mismatch(s, n, f"{where}[{i}]")) is not None:
                return why
    elif static != new:
        return f"GraphedStep: {where} is {new!r}, but the captured step was recorded with {static!r}"
    return None


def _copy_into(static, new, where):
    """Copy a batch into the captured batch's buffers, checking that the structure and shapes are the same."""
    if (why := _mismatch(static, new, where)) is not None:
        raise ValueError(why)
    _copy(static, new)


def _copy(static, new):
    if isinstance(static, torch.Tensor):
        static.copy_(new, non_blocking=True)
    elif isinstance(static, dict):
        for k in static:
            _copy(static[k], new[k])
    elif isinstance(static, (list, tuple)):
        for s, n in zip(static, new, strict=True):
            _copy(s, n)
