"""``--engine torch`` of pretrain.py and finetune.py: one process on one device, plain PyTorch, the training step
as a CUDA graph.

Why a second engine: at LXMERT's sizes a training step is a few thousand small kernels, and launched one by one
from Python the CPU cannot keep a GPU busy. On an H100 (bf16, batch 256, benchmarks/profile_step.py) an eager step
takes 107 ms and the same step replayed as a CUDA graph 48 ms (41 ms compiled); DeepSpeed cannot replay its step as
a graph (its gradient hooks and loss scaling run on the host). For several GPUs, or ZeRO's memory savings, use the
DeepSpeed engine.

What this engine does per micro-batch:

- ``forward_backward(batch)``: the losses and the gradients. On a GPU, bf16 autocast and, from the fourth call on,
  a CUDA graph replay (lxmert_fast.cuda_graphs.GraphedStep); eagerly on a CPU, and with gradient accumulation.
- ``step()``: at each accumulation boundary, gradient clipping (the DeepSpeed JSON's ``gradient_clipping``), the
  optimiser and the learning-rate schedule, launched eagerly: the caller checks the losses for NaN first, so a
  non-finite loss never updates the weights.

It mirrors the part of DeepSpeed's engine that the training loops use (``device``, ``train``/``eval``, calling it
for validation, ``save_checkpoint``/``load_checkpoint``), so the loops (``training.train_micro_batch``), the
``latest`` pointer and exact resume are shared with the DeepSpeed engine. A checkpoint is one ``state.pt`` per
tag: model, optimiser and schedule state and the loop's client state, read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from lxmert_fast.cuda_graphs import GraphedStep

CHECKPOINT_FILE = "state.pt"
# the model's keyword arguments that the loops set per batch; None marks a batch over the capacity (modeling.py)
CAPACITY_KEYS = ("lm_label_capacity", "text_token_capacity")


class SingleDeviceEngine:
    def __init__(self, module, optimizer, scheduler, *, device, precision, gradient_clipping=0.0,
                 accumulation=1, cuda_graphs=True, compile_model=False):
        """``module(batch)`` returns a dict with the total loss under "loss" (pretrain.py's PretrainingObjective,
        the tasks' FinetuneObjective). ``precision``: "bf16" (autocast; the weights stay fp32) or "fp32"."""
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"--engine torch trains in bf16 or fp32, not {precision}")
        self.module = module
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device = torch.device(device)
        self.precision = precision
        self.gradient_clipping = float(gradient_clipping or 0.0)
        self.accumulation = int(accumulation)
        self.forward_fn = torch.compile(module) if compile_model else module
        self.micro_steps = 0
        self.skipped_steps = 0  # no loss scaling, so no overflow steps; kept for the loop's metrics
        self.graphed = None
        self.eager_steps = 0  # steps run outside the graph (a batch it does not fit)
        if cuda_graphs and self.device.type == "cuda" and self.accumulation == 1:
            # graph replays overwrite the gradients instead of adding to them, so accumulation runs eagerly
            self.graphed = GraphedStep(self._forward_backward, optimizer)

    # ---------------------------------------------------------------------------------------------- training
    def _autocast(self):
        if self.precision == "bf16":
            # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _forward_backward(self, batch):
        with self._autocast():
            losses = self.forward_fn(batch)
        (losses["loss"] / self.accumulation).backward()
        return {k: v.detach() for k, v in losses.items()}

    def forward_backward(self, batch):
        """Losses of ``batch`` (a dict of detached scalars) with their gradients added to the parameters'."""
        if self.graphed is None:
            return self._forward_backward(batch)
        why = self.graphed.why_not(batch)
        over_capacity = any(key in batch and batch[key] is None for key in CAPACITY_KEYS)
        if why is None and self.graphed.graph is None and over_capacity:
            why = "it is over a capacity (None), so it must not be the batch the graph is recorded for"
        if why is None:
            return self.graphed(batch)  # the graph's loss buffers: read them before the next call
        # e.g. a batch with more masked words than the LM head's rows in the graph (lm_label_capacity None)
        self.eager_steps += 1
        if self.eager_steps == 1:
            warnings.warn(f"a batch the CUDA graph was not recorded for runs eagerly: {why}", stacklevel=2)
        return self.graphed.run_eagerly(batch)

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.accumulation == 0

    def step(self):
        """End of a micro-batch: at an accumulation boundary clip, update the weights and move the schedule on."""
        if self.is_gradient_accumulation_boundary():
            if self.gradient_clipping > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.gradient_clipping, foreach=True)
            self.optimizer.step()
            self.scheduler.step()
            if self.graphed is None:
                # a graph's replay overwrites the gradients it owns; dropping them would detach them from it
                self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def __call__(self, batch):
        """Losses only (validation, under torch.no_grad())."""
        with self._autocast():
            return self.forward_fn(batch)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    # ----------------------------------------------------------------- what pretrain.py asks of either engine
    def zero_optimization_stage(self):
        return 0

    def fp16_enabled(self):
        return False

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest=False):
        """Write ``ckpt_dir/tag/state.pt`` (through a temporary file, so a crash leaves no half-written one)."""
        folder = os.path.join(ckpt_dir, tag)
        os.makedirs(folder, exist_ok=True)
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro_steps": self.micro_steps,
            "client_state": client_state,
        }
        path = os.path.join(folder, CHECKPOINT_FILE)
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, ckpt_dir, tag):
        """Load ``ckpt_dir/tag/state.pt``; returns (path, client_state). Never executes code from the file."""
        path = os.path.join(ckpt_dir, tag, CHECKPOINT_FILE)
        try:
            # on the CPU: the RNG states in the client state must stay CPU tensors; load_state_dict moves the
            # weights and the optimiser state to the parameters' device
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.micro_steps = int(state["micro_steps"])
            client_state = state["client_state"]
        except Exception as error:  # noqa: BLE001 - torch.load and load_state_dict raise many types
            raise RuntimeError(
                f"{path}: not a checkpoint of pretrain.py --engine torch ({str(error).splitlines()[0]})"
            ) from error
        return path, client_state
