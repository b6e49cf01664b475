"""``--engine torch``: one process on one device, plain PyTorch, the training step as a CUDA graph.

Why a second engine: at LXMERT's sizes a training step is a few thousand small kernels, and launched one by one
from Python the CPU cannot keep a GPU busy; DeepSpeed cannot replay its step as a graph (its gradient hooks and loss
scaling run on the host). For several GPUs, or ZeRO's memory savings, use the DeepSpeed engine.

Per micro-batch (``forward_backward``): the losses and gradients, on a GPU under bf16 autocast and, from the fourth
call on, as a CUDA graph replay (lxmert_fast.train.cuda_graphs.GraphedStep) of the objective with its static shapes;
a batch that does not fit them runs eagerly, into the graph's gradient buffers. Then ``step``: at an accumulation
boundary gradient clipping (the DeepSpeed JSON's ``gradient_clipping``), the optimiser and the schedule, launched
eagerly; the optimiser skips the update on the device after a non-finite loss (``skip_updates_while``), so a NaN never
updates the weights and nothing waits for the device.

It speaks the loop's engine protocol (lxmert_fast.train.engines.Engine). A checkpoint is one ``state.pt`` per tag:
model, optimiser and schedule state and the loop's client state, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from lxmert_fast.errors import CheckpointError
from lxmert_fast.files import atomic_path
from lxmert_fast.train.cuda_graphs import GraphedStep

CHECKPOINT_FILE = "state.pt"


class SingleDeviceEngine:
    def __init__(self, module, optimizer, scheduler, *, device, precision, gradient_clipping=0.0,
                 accumulation=1, cuda_graphs=True, compile_model=False):
        """``module(batch, static=...)`` returns a dict with the total loss under "loss" (lxmert_fast.train.objectives).
        ``precision``: "bf16" (autocast; the weights stay fp32) or "fp32"."""
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"--engine torch trains in bf16 or fp32, not {precision}")
        self.module = module
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device = torch.device(device)
        self.precision = precision
        self.gradient_clipping = float(gradient_clipping or 0.0)
        self.accumulation = int(accumulation)
        self.compiled = compile_model
        self.forward_fn = torch.compile(module) if compile_model else module
        self.batch_dtype = torch.float32  # the weights stay fp32 under bf16 autocast
        self.micro_steps = 0
        self.graphed = None
        self.eager_steps = 0  # steps run outside the graph (a batch that does not fit it)
        if cuda_graphs and self.device.type == "cuda" and self.accumulation == 1:
            # graph replays overwrite the gradients instead of adding to them, so accumulation runs eagerly
            self.graphed = GraphedStep(self._graphed_step, optimizer)
        self.needs_static_shapes = compile_model or self.graphed is not None

    # ---------------------------------------------------------------------------------------------- training
    def _autocast(self):
        if self.precision == "bf16":
            # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _forward_backward(self, batch, static):
        with self._autocast(), _eager_if(self.compiled and not static):
            losses = self.forward_fn(batch, static=static)
        (losses["loss"] / self.accumulation).backward()
        return {k: v.detach() for k, v in losses.items()}

    def _graphed_step(self, batch):
        return self._forward_backward(batch, static=True)

    def _eager_step(self, batch):
        return self._forward_backward(batch, static=False)

    def forward_backward(self, batch, static=False):
        """Losses of ``batch`` (a dict of detached scalars) with their gradients added to the parameters'.
        ``static``: the batch fits the objective's static shapes (and may then be replayed as the graph)."""
        if self.graphed is None:
            return self._forward_backward(batch, static)
        if static:
            why = self.graphed.why_not(batch)
            if why is None:
                return self.graphed(batch)  # the graph's loss buffers: read them before the next call
        else:
            why = "it does not fit the static shapes"
        self.eager_steps += 1
        if self.eager_steps == 1:
            warnings.warn(f"a batch the CUDA graph was not recorded for runs eagerly: {why}", stacklevel=2)
        return self.graphed.run_eagerly(batch, self._eager_step)

    def step(self):
        """End of a micro-batch: at an accumulation boundary clip, update the weights and move the schedule on."""
        if (self.micro_steps + 1) % self.accumulation == 0:
            if self.gradient_clipping > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.gradient_clipping, foreach=True)
            self.optimizer.step()
            self.scheduler.step()
            if self.graphed is None:
                # a graph's replay overwrites the gradients it owns; dropping them would detach them from it
                self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def skip_updates_while(self, found_inf):
        self.optimizer.found_inf = found_inf  # read by the optimiser's step (lxmert_fast.train.optimization)

    def evaluate(self, batch, static=False):
        """The objective's outputs, without gradients."""
        with torch.no_grad(), self._autocast(), _eager_if(self.compiled and not static):
            return self.forward_fn(batch, static=static)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def counters(self):
        return {"eager_steps": self.eager_steps} if self.graphed is not None else {}

    def whole_parameters(self, module):
        return contextlib.nullcontext()

    def describe(self):
        return "plain PyTorch" + (", CUDA graphs" if self.graphed is not None else "") + (
            ", compiled" if self.compiled else "")

    # --------------------------------------------------------------------------------------------- checkpoints
    def save(self, ckpt_dir, tag, client_state):
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
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def checkpoint_problems(self, folder):
        path = os.path.join(folder, CHECKPOINT_FILE)
        return None if os.path.isfile(path) or os.path.isdir(folder) else f"no {path}"

    def load(self, ckpt_dir, tag):
        """Load ``ckpt_dir/tag/state.pt``; returns its client state. Never executes code from the file."""
        folder = os.path.join(ckpt_dir, tag)
        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.isfile(path) and os.path.isdir(folder) and os.listdir(folder):
            raise CheckpointError(f"{folder} has no {CHECKPOINT_FILE}: it was written by DeepSpeed, resume it with "
                               "--engine deepspeed")
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
            raise CheckpointError(
                f"{path}: not a checkpoint of --engine torch ({str(error).splitlines()[0]})"
            ) from error
        return client_state


def _eager_if(condition):
    """Run compiled code eagerly (a batch without static shapes under torch.compile)."""
    return torch.compiler.set_stance("force_eager") if condition else contextlib.nullcontext()
