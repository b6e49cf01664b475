"""Whole-step CUDA graphs: record a training step (forward, backward, optimiser) once, replay it for every batch.

At LXMERT's sizes a step is about two thousand small kernels. Launched one by one from Python, the CPU cannot keep
the GPU busy: on an H100 an eager step at batch 64 takes as long as one at batch 256. A replayed graph launches the
whole step in one call, so the GPU runs back to back.

What a graphed step needs, all of which lxmert_fast's models and the usage below provide:

- the same shapes for every batch (pre-training batches are padded to a fixed length; use ``drop_last``);
- no host synchronisation inside the step: lxmert_fast keeps static shapes while a graph is captured (see
  ``modeling.static_shapes_only``), and its kernels draw dropout seeds on the device, so every replay gets new masks;
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
    keep them.
    """

    def __init__(self, step_fn: Callable, optimizer: torch.optim.Optimizer | None, warmup: int = 3):
        if warmup < 1:
            raise ValueError("GraphedStep needs at least one eager warm-up step before capturing")
        self.step_fn, self.optimizer, self.warmup = step_fn, optimizer, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch = self.static_out = None
        self.calls = 0
        self._side_stream = torch.cuda.Stream()

    def __call__(self, batch):
        self.calls += 1
        if self.graph is not None:
            _copy_into(self.static_batch, batch, "batch")
            self.graph.replay()
            return self.static_out
        if self.calls <= self.warmup:
            # warm-up on a side stream, as capture requires: lazy initialisation (cuBLAS handles, autotuning,
            # optimiser state) happens here, not in the graph
            self._side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side_stream):
                self._zero_grad()
                out = self.step_fn(batch)
            torch.cuda.current_stream().wait_stream(self._side_stream)
            return out
        self.static_batch = _clone(batch)
        self._zero_grad()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = self.step_fn(self.static_batch)
        self.graph = graph
        graph.replay()  # capturing records the step without running it
        return self.static_out

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


def _copy_into(static, new, where):
    """Copy a batch into the captured batch's buffers, checking that the structure and shapes are the same."""
    if isinstance(static, torch.Tensor):
        if not isinstance(new, torch.Tensor) or new.shape != static.shape or new.dtype != static.dtype:
            got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"GraphedStep: {where} is {got}, but the captured step was recorded with {tuple(static.shape)} "
                f"{static.dtype}; a CUDA graph replays fixed shapes (pad batches to one size, drop the last one)"
            )
        static.copy_(new, non_blocking=True)
    elif isinstance(static, dict):
        if not isinstance(new, dict) or new.keys() != static.keys():
            raise ValueError(f"GraphedStep: {where} has keys {sorted(new)}, the captured step had {sorted(static)}")
        for k in static:
            _copy_into(static[k], new[k], f"{where}[{k!r}]")
    elif isinstance(static, (list, tuple)):
        if not isinstance(new, (list, tuple)) or len(new) != len(static):
            raise ValueError(f"GraphedStep: {where} does not have the captured step's {len(static)} items")
        for i, (s, n) in enumerate(zip(static, new, strict=True)):
            _copy_into(s, n, f"{where}[{i}]")
    elif static != new:
        raise ValueError(f"GraphedStep: {where} is {new!r}, but the captured step was recorded with {static!r}")
