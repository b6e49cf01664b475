"""The engines the training loop runs on, behind one small protocol (``Engine``).

- ``DeepSpeedEngine``: DeepSpeed's engine (any ZeRO stage, fp16 loss scaling, many ranks and nodes);
- ``lxmert_fast.train.single_device.SingleDeviceEngine``: one process on one device, plain PyTorch, bf16 autocast and
  the step replayed as a CUDA graph on a GPU.

Both wrap an objective: a module whose ``forward(batch, static=False)`` returns a dict with the total loss under
"loss" (lxmert_fast.train.objectives). ``static`` asks for the objective's static shapes
(lxmert_fast.model.static_shapes); the loop sets it for a batch that fits them when the engine
``needs_static_shapes`` (compiled or graphed), and the engine runs a batch without them eagerly.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import torch

from lxmert_fast.errors import CheckpointError
from lxmert_fast.train.distributed import local_device
from lxmert_fast.train.single_device import CHECKPOINT_FILE, SingleDeviceEngine


class Engine(Protocol):
    device: torch.device
    batch_dtype: torch.dtype  # the dtype the batches' floats move in
    needs_static_shapes: bool  # compiled or graphed: batches that fit the objective's static shapes use them

    def forward_backward(self, batch, static: bool) -> dict:
        """One micro-batch's losses (the objective's dict), its gradients added to the parameters'."""

    def step(self) -> None:
        """End of a micro-batch: at an accumulation boundary clip, update the weights and move the schedule on."""

    def skip_updates_while(self, found_inf: torch.Tensor) -> None:
        """Skip every update, on the device, while ``found_inf`` (a 0-dim float tensor on ``device``, changed in
        place by the loop) is nonzero; the step never reads it back to the host."""

    def evaluate(self, batch, static: bool) -> dict:
        """The objective's outputs without gradients."""

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None: ...

    def load(self, ckpt_dir: str, tag: str) -> dict:
        """Load the checkpoint ``ckpt_dir/tag``; returns its client state. Never executes code from the file."""

    def checkpoint_problems(self, folder: str) -> str | None:
        """Why this rank could not load checkpoint ``folder`` (a missing file, another rank count), or None."""

    def counters(self) -> dict:
        """Numbers for metrics.jsonl (the loss scale and skipped steps of fp16, steps run outside a graph)."""

    def whole_parameters(self, module):
        """Context in which ``module``'s parameters are whole on every rank."""

    def describe(self) -> str: ...


def build_engine(settings, objective, optimizer, scheduler) -> Engine:
    """The engine ``settings`` (a run config's EngineSettings) ask for, around ``objective`` with our optimiser and
    schedule."""
    if settings.name == "torch":
        return SingleDeviceEngine(
            objective.to(local_device()), optimizer, scheduler, device=local_device(), precision=settings.precision,
            gradient_clipping=settings.gradient_clipping, accumulation=settings.accumulation,
            cuda_graphs=settings.cuda_graphs, compile_model=settings.compile,
        )
    return DeepSpeedEngine(objective, optimizer, scheduler, settings)


def _eager_if(condition):
    """Run compiled code eagerly (a batch without static shapes under torch.compile)."""
    return torch.compiler.set_stance("force_eager") if condition else contextlib.nullcontext()


def declare_zero_safe(optimizer_class) -> None:
    """Tell DeepSpeed that ZeRO may partition ``optimizer_class``'s state (else it warns "You are using ZeRO with an
    untested optimizer"): our BertAdam updates every element from that element's gradient and state alone, so a
    rank's slice of a flat fp32 partition gets exactly the update the whole tensor would."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from lxmert_fast.train.optimization import BertAdam

    if issubclass(optimizer_class, BertAdam) and optimizer_class not in ZERO_SUPPORTED_OPTIMIZERS:
        ZERO_SUPPORTED_OPTIMIZERS.append(optimizer_class)


class DeepSpeedEngine:
    """DeepSpeed owns precision, ZeRO, clipping and accumulation; this adapter speaks the loop's protocol."""

    def __init__(self, objective, optimizer, scheduler, settings):
        """``settings``: the run config's EngineSettings; its DeepSpeed JSON goes to DeepSpeed as it is."""
        import deepspeed

        declare_zero_safe(type(optimizer))
        self.optimizer = optimizer  # ours: DeepSpeed's wrappers (ZeRO, bf16, fp16) call its step()
        self.engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=settings.deepspeed_config())
        self.compiled, self.zero_stage = settings.compile, settings.zero_stage
        if self.compiled:
            self.engine.compile()
        self.device = self.engine.device
        self.batch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.precision, torch.float32)
        self.needs_static_shapes = self.compiled
        install_safe_load(self.engine)

    def forward_backward(self, batch, static):
        with _eager_if(self.compiled and not static):
            losses = self.engine(batch, static=static)
        self.engine.backward(losses["loss"])
        return losses

    def step(self):
        self.engine.step()  # DeepSpeed counts the micro-batches and updates at the accumulation boundary

    def skip_updates_while(self, found_inf):
        self.optimizer.found_inf = found_inf  # read by the optimiser's step (lxmert_fast.train.optimization)

    def evaluate(self, batch, static):
        with torch.no_grad(), _eager_if(self.compiled and not static):
            return self.engine(batch, static=static)

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    def save(self, ckpt_dir, tag, client_state):
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir, tag):
        folder = os.path.join(ckpt_dir, tag)
        if os.path.isfile(os.path.join(folder, CHECKPOINT_FILE)):
            raise CheckpointError(f"{folder} was written by --engine torch: resume it with --engine torch")
        if self._written_by_other_ranks(folder):  # ZeRO 1-3 on another rank count: resharded here
            from lxmert_fast.train import reshard

            return reshard.apply(self.engine, reshard.consolidate(folder))
        path, client_state = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        if path is None:
            raise CheckpointError(f"could not load checkpoint {folder}")
        return client_state

    def _written_by_other_ranks(self, folder):
        from lxmert_fast.train.reshard import partition_files

        return bool(self.zero_stage) and len(partition_files(folder)) not in (0, self.engine.dp_world_size)

    def checkpoint_problems(self, folder):
        """This rank reads the whole module (ZeRO 0-2) or its own shard (ZeRO-3), and its optimiser partition; a
        ZeRO checkpoint of another rank count is read whole by every rank (lxmert_fast.train.reshard)."""
        from lxmert_fast.model.folder import DEEPSPEED_MODEL_FILE, ZERO3_MODEL_FILE, ZERO3_OPTIM_FILE

        if not os.path.isdir(folder):
            return f"no folder {folder}"
        if os.path.isfile(os.path.join(folder, CHECKPOINT_FILE)):
            return f"{folder} was written by --engine torch: resume it with --engine torch"
        try:
            resharded = self._written_by_other_ranks(folder)
        except CheckpointError as error:
            return str(error)
        rank = 0 if resharded else self.engine.global_rank  # resharded: rank 0's model states, every partition
        needed = [ZERO3_MODEL_FILE.format(rank=rank) if self.zero_stage == 3 else DEEPSPEED_MODEL_FILE]
        if self.zero_stage and not resharded:
            needed.append(ZERO3_OPTIM_FILE.format(rank=rank))
        missing = [name for name in needed if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            return f"no {', '.join(missing)} in {folder}"
        return None

    def counters(self):
        if self.batch_dtype != torch.float16:  # loss scaling is fp16's
            return {}
        scale = getattr(self.engine.optimizer, "cur_scale", None)
        record = {"skipped_steps": int(self.engine.skipped_steps)}
        if scale is not None and not callable(scale):
            record["loss_scale"] = float(scale)
        return record

    def whole_parameters(self, module):
        if self.zero_stage == 3:  # each rank holds a shard of every parameter
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def describe(self):
        return f"DeepSpeed ZeRO-{self.zero_stage}" + (", compiled" if self.compiled else "")


# The objects DeepSpeed pickles into its checkpoints besides tensors; loading allows these and nothing else.
def _deepspeed_checkpoint_classes():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path, map_location=None):
    """torch.load(weights_only=True) with DeepSpeed's few checkpoint classes allowed: a checkpoint never executes
    code when loaded. An unreadable file is a CheckpointError naming it."""
    with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch.load raises many types; all mean "unreadable"
            raise CheckpointError(f"{path}: not a loadable checkpoint ({str(error).splitlines()[0]})") from error


def install_safe_load(engine):
    """The one hook into DeepSpeed: its checkpoint engine reads files with ``safe_load`` instead of
    torch.load(weights_only=False)."""
    if engine.checkpoint_engine is None:
        engine._configure_checkpointing()
    engine.checkpoint_engine.load = safe_load
