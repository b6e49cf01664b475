"""One training loop for pre-training and fine-tuning.

The loop knows a run's life cycle and nothing of the model: it is given a resolved RunConfig, an engine (protocol
in lxmert_fast.train.engines), an objective (lxmert_fast.train.objectives: the model and its losses, the host-side batch
preparation and the static shapes) and hooks for the task's own parts (evaluation at an epoch's end, what goes
into a checkpoint's client state). Per micro-batch: seed every RNG from (seed, micro-step, rank), prepare the batch
on the host, ask whether it fits the static shapes, move it, the engine's losses and gradients, the losses added up
on the device with a flag for NaN or inf on any rank (metrics.LossGuard), then the engine's step (the update, at an
accumulation boundary), which the flag skips on the device: a NaN never updates the weights, and nothing waits for
the device. The losses are read back only to log (every --log-every steps), before a checkpoint and at an epoch's
end: a non-finite loss stops every rank there, naming its step. Per epoch: the hooks. ``build_trainer`` plans the
steps once, for the schedule and the loop.

The output folder: a new run refuses a folder that holds another run's metrics or checkpoints unless told
``--resume`` or ``--overwrite``; ``run_config.json`` is written at the start; a resumed run must match it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch

from lxmert_fast.data.pretrain_dataset import to_device
from lxmert_fast.errors import ConfigError, NonFiniteLossError, RankTimeoutError
from lxmert_fast.files import write_text
from lxmert_fast.model.folder import MODEL_SPEC
from lxmert_fast.train import checkpoints, distributed, feed, metrics, sampling, seeding
from lxmert_fast.train.engines import build_engine
from lxmert_fast.train.optimization import build_optimizer, build_scheduler
from lxmert_fast.train.run_config import RUN_CONFIG_FILE, RunConfig

RUN_OUTPUTS = (metrics.METRICS_FILE, "checkpoints", "tensorboard", RUN_CONFIG_FILE, "final_model", "best_model")


@dataclass
class Position:
    """Where the loop is; saved in every checkpoint, so a resumed run goes on from the same sample."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    pos: int = 0  # micro-batches done in this epoch
    micro_step: int = 0  # micro-batches done in the run


class Hooks:
    """The task's parts of the loop; the defaults do nothing."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Before each epoch's batches are drawn (pre-training: the epoch's masking)."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After each epoch (and at the last step): evaluate, keep the best model."""

    def client_state(self) -> dict:
        """What the task keeps in a checkpoint besides the loop's position."""
        return {}

    def load_client_state(self, state: dict) -> None:
        pass


def start(config: RunConfig) -> None:
    """A run's start: join the process group, print the resolved config once, check and claim the output folder."""
    distributed.init_distributed(config.run.process_group_timeout)
    if distributed.world_size() != config.engine.world_size:
        raise ConfigError(f"the run config was resolved for {config.engine.world_size} rank(s), the process group has "
                          f"{distributed.world_size()}")
    distributed.print0(config.summary())
    prepare_output_dir(config)


def prepare_output_dir(config: RunConfig) -> None:
    """Refuse an output folder that holds another run unless --resume or --overwrite; --overwrite clears it; refuse
    one that not every rank sees (each node its own disk). Then save the run config (a resumed run's config is
    checked against the saved one first; a resumed run without one saves it once its checkpoint has loaded, so a
    resume that fails leaves nothing behind that would refuse the next try)."""
    out = config.run.output_dir
    found = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(out, name))]
    saved_path = os.path.join(out, RUN_CONFIG_FILE)
    if config.run.resume and os.path.isfile(saved_path):
        with open(saved_path) as f:
            config.check_resume(json.load(f), saved_path)
    elif found and not (config.run.resume or config.run.overwrite):
        raise ConfigError(
            f"--output-dir {out} holds another run ({', '.join(found)}): continue it with --resume, replace it "
            "with --overwrite, or choose another --output-dir"
        )
    distributed.barrier()  # every rank has looked (and refused alike) before the main rank writes
    if distributed.is_main():
        if config.run.overwrite and not config.run.resume:
            for name in found:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.makedirs(out, exist_ok=True)
    distributed.check_shared_folder(out, "--output-dir")
    if not config.run.resume:
        save_run_config(config)


def save_run_config(config: RunConfig, resumed_at=None) -> None:
    """``run_config.json`` in the output folder (written by rank 0; every rank waits for it). A run resumed at step
    ``resumed_at`` with another batch geometry (another rank count) keeps the earlier runs' configs under
    "earlier_runs", each with the step the next one took over at."""
    path = os.path.join(config.run.output_dir, RUN_CONFIG_FILE)
    if distributed.is_main():
        record = json.loads(config.to_json())
        saved = None
        if resumed_at is not None and os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
        if saved is not None:
            earlier = saved.pop("earlier_runs", [])
            if any(saved.get("engine", {}).get(k) != record["engine"][k] for k in BATCH_GEOMETRY):
                earlier.append({**saved, "resumed_at_step": resumed_at})
            if earlier:
                record["earlier_runs"] = earlier
        write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    distributed.barrier()


BATCH_GEOMETRY = ("micro_batch", "accumulation", "world_size")


def regrouped(position: Position, saved_geometry: dict | None, engine) -> Position:
    """A checkpoint's position in this run's micro-batches: the same optimiser step and sample, counted in
    micro-batches of ``micro_batch x world_size`` samples (a resume on another rank count keeps the global batch,
    so a checkpoint, always at an optimiser step's end, falls on a micro-batch boundary of either geometry)."""
    if not saved_geometry:
        return position
    old = saved_geometry["micro_batch"] * saved_geometry["world_size"]
    new = engine.micro_batch * engine.world_size
    if old == new:
        return position
    if (position.pos * old) % new or (position.micro_step * old) % new:
        raise ConfigError(f"the checkpoint stopped after {position.pos} micro-batches of {old} samples, not a whole "
                          f"number of this run's micro-batches of {new}: resume with the global batch it was "
                          "written with")
    return Position(step=position.step, epoch=position.epoch, pos=position.pos * old // new,
                    micro_step=position.micro_step * old // new)


@dataclass(frozen=True)
class StepPlan:
    """How far a run trains: micro-batches per epoch (whole optimiser steps), optimiser steps, epochs."""

    micro_per_epoch: int = 0
    total_steps: int = 0
    epochs: int = 0


def plan_steps(config: RunConfig, train_set) -> StepPlan:
    """The one step plan of a run: ``config.run.epochs`` over ``train_set`` (none: nothing to train), cut at
    --max-steps. The schedule and the loop both take it from here."""
    engine, epochs = config.engine, config.run.epochs
    if train_set is None or epochs <= 0:
        return StepPlan()
    per_epoch = sampling.num_micro_batches(len(train_set), engine.micro_batch, engine.world_size)
    steps_per_epoch = per_epoch // engine.accumulation
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training samples are fewer than one global batch ({engine.global_batch})")
    total = epochs * steps_per_epoch
    if config.run.max_steps is not None:
        total = min(total, config.run.max_steps)
    return StepPlan(steps_per_epoch * engine.accumulation, total, math.ceil(total / steps_per_epoch))


def build_trainer(config: RunConfig, objective, train_set=None, collate=None, **trainer_args) -> Trainer:
    """The steps planned, our optimiser and schedule over them, the engine around ``objective``, and the loop."""
    plan, opt = plan_steps(config, train_set), config.optimisation
    optimizer = build_optimizer(objective.parameters(), opt.optimizer, opt.lr, opt.weight_decay)
    scheduler = build_scheduler(optimizer, max(plan.total_steps, 1), opt.warmup)
    engine = build_engine(config.engine, objective, optimizer, scheduler)
    return Trainer(config, engine, objective, scheduler, plan, train_set, collate, **trainer_args)


class Trainer:
    def __init__(self, config: RunConfig, engine, objective, scheduler, plan: StepPlan, train_set=None, collate=None,
                 *, save_model=None, hooks: Hooks | None = None, name="train"):
        """``save_model(folder, weights=True)``: writes the model as a self-contained folder (rank 0); without
        weights into each checkpoint, so that it exports (lxmert_fast.model.folder)."""
        self.config, self.engine, self.objective, self.scheduler = config, engine, objective, scheduler
        self._save_model = save_model
        self.train_set, self.collate = train_set, collate
        self.hooks = hooks or Hooks()
        self.position = Position()
        self.ckpt_dir = os.path.join(config.run.output_dir, "checkpoints")
        self.last_checkpoint = None
        self.micro_per_epoch, self.total_steps, self.epochs = plan.micro_per_epoch, plan.total_steps, plan.epochs
        self.metrics = metrics.MetricsLogger(config.run.output_dir, enabled=distributed.is_main())
        self.bar = metrics.progress_bar(self.total_steps, desc=name)
        self.timer = metrics.Timer()
        self.guard = metrics.LossGuard(engine.device)
        engine.skip_updates_while(self.guard.found_inf)
        self.first_loss, self.last_loss = None, None
        self._loader = None  # the run's one training DataLoader (feed.training_loader), made once
        self.t_start = time.perf_counter()

    @property
    def num_workers(self):
        workers = self.config.run.num_workers
        return workers if workers is not None else min(8, (os.cpu_count() or 2) // 2)

    # ----------------------------------------------------------------------------------------------- resume
    def resume(self):
        """With --resume: load the latest checkpoint (if any) and drop the killed run's metrics past it."""
        if not self.config.run.resume:
            return
        tag, state = checkpoints.load_checkpoint(self.engine, self.ckpt_dir)
        if tag is not None:
            self.last_checkpoint = tag
            self.position = regrouped(Position(**state["position"]), state.get("geometry"), self.config.engine)
            rngs = state["rng"]
            seeding.set_rng_state(rngs[distributed.rank()] if distributed.rank() < len(rngs) else rngs[0])
            self.hooks.load_client_state(state.get("task", {}))
            distributed.print0(f"resumed from {os.path.join(self.ckpt_dir, tag)}: step {self.position.step}, "
                            f"epoch {self.position.epoch}")
        else:
            distributed.print0(f"--resume: no checkpoint in {self.ckpt_dir}, starting from the beginning")
        if distributed.is_main():
            metrics.truncate_metrics(self.metrics.path, self.position.step)
        self.bar.update(self.position.step)
        save_run_config(self.config, resumed_at=self.position.step)

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self):
        """Train to the last step; the hooks run at each epoch's end (once, for evaluation, without training)."""
        self.resume()
        p = self.position
        if self.total_steps == 0:
            self.hooks.on_epoch_end(self)
        try:
            while p.step < self.total_steps and p.epoch < self.epochs:
                self._train_epoch()
                self._read_losses()  # a non-finite loss stops the run before the epoch's evaluation
                if p.pos >= self.micro_per_epoch:
                    p.epoch, p.pos = p.epoch + 1, 0
                self.hooks.on_epoch_end(self)
                self.checkpoint()
        except RuntimeError as error:
            if not distributed.timed_out(error):
                raise
            raise RankTimeoutError(
                f"rank {distributed.rank()} waited {self.config.run.process_group_timeout:g} s "
                f"(--process-group-timeout) for the other ranks at step {p.step + 1}: one of them froze, died or fell "
                f"behind; {self._last_good()}; continue with --resume"
            ) from error
        finally:
            self.bar.close()
            self._loader = None  # its persistent workers stop

    def _train_epoch(self):
        p, config = self.position, self.config
        self.hooks.on_epoch_start(self)
        self.training_loader().batch_sampler.set_epoch(p.epoch, p.pos, self.micro_per_epoch)
        for batch, static in feed.DevicePrefetch(self._loader, self.to_device, self.engine.device):
            seeding.seed_step(config.run.seed, p.micro_step, distributed.rank())
            lr = self.scheduler.get_last_lr()[0]  # the rate this update uses (the scheduler moves on in step())
            losses = self.engine.forward_backward(batch, static)
            self.guard.add({k: v for k, v in losses.items() if k.endswith("loss")}, p.micro_step)
            self.engine.step()  # skipped on the device from a non-finite loss on
            p.micro_step, p.pos = p.micro_step + 1, p.pos + 1
            self.timer.add(config.engine.micro_batch * config.engine.world_size)
            if p.micro_step % config.engine.accumulation:
                continue
            p.step += 1
            self.bar.update(1)
            if p.step % config.run.log_every == 0 or p.step == self.total_steps:
                self._log_step(lr)
            if p.step >= self.total_steps:
                return
            if config.run.save_every and p.step % config.run.save_every == 0 and p.pos < self.micro_per_epoch:
                self.checkpoint()

    def training_loader(self):
        """The run's one training DataLoader, its workers kept from epoch to epoch (lxmert_fast.train.feed)."""
        if self._loader is None:
            config = self.config
            batches = feed.EpochBatches(len(self.train_set), config.engine.micro_batch, config.run.seed,
                                        distributed.rank(), config.engine.world_size,
                                        keyed=feed.epoch_keyed(self.train_set))
            self._loader = feed.training_loader(self.train_set, batches, self.collate, self.num_workers,
                                                self.engine.device)
        return self._loader

    def to_device(self, batch):
        """The host batch prepared by the objective, on the engine's device; and whether it fits the static shapes
        (asked only of an engine that needs them)."""
        batch = self.objective.prepare(batch)
        static = self.engine.needs_static_shapes and self.objective.fits(batch)
        return to_device(batch, self.engine.device, self.engine.batch_dtype), static

    def _read_losses(self):
        """The mean losses since the last log, read back from the device (every rank at the same point); a NaN or
        inf seen on any rank since the start stops the run here (its updates were skipped on the device)."""
        reading = self.guard.read()
        if reading.bad_micro_step is not None:
            bad, accumulation = reading.bad_micro_step, self.config.engine.accumulation
            raise NonFiniteLossError(
                f"non-finite loss at step {bad // accumulation + 1} (epoch {bad // self.micro_per_epoch}, "
                f"micro-batch {bad % self.micro_per_epoch}): {reading.bad_losses}; weights were not updated from "
                f"it on; {self._last_good()}"
            )
        return reading.means

    def _last_good(self):
        return (f"the last good checkpoint is {os.path.join(self.ckpt_dir, self.last_checkpoint)}"
                if self.last_checkpoint else "no checkpoint was written yet")

    def _log_step(self, lr):
        p = self.position
        record = {"event": "train", "step": p.step, "epoch": p.epoch, "lr": lr}
        record.update(self._read_losses())
        record["samples_per_s"] = self.timer.rate()
        record.update(self.engine.counters())
        self.log(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}")
        self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = record["loss"]
        self.guard.reset_means()

    def log(self, record):
        self.metrics.log(record)

    # ---------------------------------------------------------------------------------------- checkpoints
    def checkpoint(self):
        self._read_losses()  # never a checkpoint after a non-finite loss
        rngs = [None] * self.config.engine.world_size
        torch.distributed.all_gather_object(rngs, seeding.rng_state())
        engine = self.config.engine
        geometry = {"micro_batch": engine.micro_batch, "accumulation": engine.accumulation,
                    "world_size": engine.world_size}
        state = {"position": asdict(self.position), "rng": rngs, "task": self.hooks.client_state(),
                 "geometry": geometry}
        describe = None
        if self._save_model is not None:
            def describe(folder):
                self._save_model(os.path.join(folder, MODEL_SPEC), weights=False)
        self.last_checkpoint = checkpoints.save_checkpoint(self.engine, self.ckpt_dir, self.position.step, state,
                                                        keep=self.config.run.keep_checkpoints, describe=describe)

    def save_model(self, folder):
        """The model as a self-contained folder, on rank 0 (ZeRO-3's shards gathered first)."""
        with self.engine.whole_parameters(self.objective):
            if distributed.is_main():
                self._save_model(folder)
        distributed.barrier()

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, dataset, collate, limit=None, seed=None):
        """The objective's outputs over ``dataset`` (all of it, the last micro-batch partial; at most ``limit``
        micro-batches per rank), yielded with each prepared host batch."""
        batches = sampling.eval_batches(len(dataset), self.config.engine.micro_batch, distributed.rank(),
                                        self.config.engine.world_size, limit=limit, seed=seed)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=self.num_workers)
        self.engine.eval()
        try:
            for host_batch in loader:
                batch, static = self.to_device(host_batch)
                yield host_batch, self.engine.evaluate(batch, static)
        finally:
            self.engine.train()

    # ---------------------------------------------------------------------------------------------- end
    def finish(self, **extra):
        """The end record; returns the run's time."""
        total_time = time.perf_counter() - self.t_start
        self.log({"event": "end", "step": self.position.step, "total_time_s": total_time,
                  "first_loss": self.first_loss, "last_loss": self.last_loss, **self.engine.counters(), **extra})
        self.metrics.close()
        return total_time
