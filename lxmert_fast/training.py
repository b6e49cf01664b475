"""Training machinery shared by pre-training and fine-tuning.

What lives here: distributed set-up that also works as a plain single process, the DeepSpeed JSON (read, adapted to
the machine, e.g. fp16 -> fp32 without CUDA), the engine, deterministic data sharding with a resumable position,
per-step seeding (so a resumed run is bit-for-bit the same as an uninterrupted one), crash-safe checkpoints, the
metrics writer (metrics.jsonl, TensorBoard when installed, tqdm on rank 0) and the non-finite-loss guard.
The task scripts (pretrain.py, later the fine-tuning scripts) keep only what is specific to their task.
"""

import contextlib
import importlib
import json
import os
import random
import shutil
import socket
import sys
import time
from typing import NamedTuple

import numpy as np
import torch

# DeepSpeed picks its accelerator when first imported; on a machine without CUDA say "cpu" explicitly so it does
# not probe for other devices (and the launcher and this process agree).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

from lxmert_fast.data import to_device  # noqa: E402,F401  (the loops call training.to_device)
from lxmert_fast.single_device import CHECKPOINT_FILE, SingleDeviceEngine  # noqa: E402

CKPT_LATEST = "latest"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf without being an fp16 overflow: training cannot go on meaningfully."""


# --------------------------------------------------------------------------------------------------- distributed
_SELF_RENDEZVOUS = "LXMERT_FAST_SINGLE_PROCESS_PORT"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Initialise torch.distributed through DeepSpeed; a plain ``python script.py`` becomes a world of one."""
    # Not started by a launcher: make the env:// rendezvous of a single process. Variables that an earlier
    # single-process run made (in this process, or inherited by a child) are ours to replace: reusing them would
    # reuse a port that process may still hold. A launcher's own MASTER_PORT differs from the one we recorded.
    ours = os.environ.get(_SELF_RENDEZVOUS) == os.environ.get("MASTER_PORT")
    if ("RANK" not in os.environ or ours) and not dist.is_initialized():
        port = str(_free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        os.environ[_SELF_RENDEZVOUS] = port
    if not torch.cuda.is_available():
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op in every process at start-up
        # (minutes on a small machine, and processes wait on one build lock). Only its inference all-reduce uses
        # it; training collectives go through gloo, so skip the build.
        # (import_module: the attribute deepspeed.comm.torch is PyTorch itself, re-exported by a star import)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())


def local_device():
    """This process's device: its GPU (LOCAL_RANK) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def shutdown():
    """Tear the process group down cleanly (NCCL warns at exit otherwise)."""
    if dist.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()


def barrier():
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------- DeepSpeed config
def start_run(args):
    """What both entry scripts do first: join the process group, read the DeepSpeed config and its batch geometry,
    make the output folder. Returns (rank, world, ds_config, precision, micro, accum, checkpoint folder)."""
    init_distributed()
    ds_config, precision = load_ds_config(args.deepspeed_config)
    micro, accum = batch_geometry(ds_config, world_size())
    os.makedirs(args.output_dir, exist_ok=True)
    return rank(), world_size(), ds_config, precision, micro, accum, os.path.join(args.output_dir, "checkpoints")


def load_ds_config(path_or_dict, log=print0):
    """Read a DeepSpeed JSON and adapt it to this machine. Returns (config dict, precision: fp16 | bf16 | fp32).

    fp16 needs CUDA (DeepSpeed's CPU accelerator has no fp16 loss-scaling path worth using): without CUDA the run
    falls back to fp32 and says so. bf16 is kept on CPU. ``train_batch_size`` is derived by DeepSpeed from the
    micro-batch, accumulation and world size, so a config that gives all three is dropped to two to stay valid for
    any number of ranks.
    """
    if isinstance(path_or_dict, dict):
        cfg = json.loads(json.dumps(path_or_dict))
    else:
        with open(path_or_dict) as f:
            cfg = json.load(f)
    for key in ("optimizer", "scheduler"):
        if key in cfg:  # the optimiser and schedule are ours (BertAdam, warm-up + linear decay); refuse a second one
            raise ValueError(f"DeepSpeed config {path_or_dict}: remove '{key}'; use --optimizer/--lr instead")
    fp16 = cfg.get("fp16", {}).get("enabled", False)
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    if fp16 and not torch.cuda.is_available():
        cfg["fp16"] = {"enabled": False}
        fp16 = False
        log("No CUDA device: fp16 is not available, training in fp32 instead (DeepSpeed config fp16 disabled).")
    if "train_micro_batch_size_per_gpu" in cfg and "gradient_accumulation_steps" in cfg:
        cfg.pop("train_batch_size", None)
    return cfg, ("fp16" if fp16 else "bf16" if bf16 else "fp32")


def batch_geometry(cfg, world):
    """(micro-batch per rank, accumulation steps) as DeepSpeed derives them from any two of the three batch keys."""
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps")
    total = cfg.get("train_batch_size")
    if micro is None and accum is None and total is None:
        raise ValueError("DeepSpeed config: set train_micro_batch_size_per_gpu (and gradient_accumulation_steps)")
    if micro is None:
        accum = accum or 1
        micro = total // (accum * world)
    elif accum is None:
        accum = max(total // (micro * world), 1) if total else 1
    if total is not None and micro * accum * world != total:
        raise ValueError(
            f"DeepSpeed config: train_batch_size {total} != micro-batch {micro} x accumulation {accum} x {world} ranks"
        )
    return micro, accum


# ------------------------------------------------------------------------------------------------------ engines
class EnginePlan(NamedTuple):
    """How a run trains, decided before the model is built: which engine, in which precision, graphed or not."""

    engine: str  # "deepspeed" | "torch" (lxmert_fast.single_device)
    precision: str  # fp16 | bf16 | fp32
    cuda_graphs: bool
    compile: bool

    @property
    def model_backend(self):
        # compiled or graphed on a GPU: the fused kernels, chosen up front (an "auto" model would switch inside the
        # first trace and cost a second compile); eager: "auto", the plain PyTorch path there (modeling.resolve_backend)
        return "triton" if (self.compile or self.cuda_graphs) and torch.cuda.is_available() else "auto"

    def describe(self, engine):
        how = f"DeepSpeed ZeRO-{engine.zero_optimization_stage()}" if self.engine == "deepspeed" else "plain PyTorch"
        return how + (", CUDA graphs" if self.cuda_graphs else "") + (", compiled" if self.compile else "")


def add_engine_arguments(parser):
    """--engine, --no-cuda-graphs, --compile, and DeepSpeed's own flags (--deepspeed, --deepspeed_config)."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        choices=("deepspeed", "torch"),
        default="deepspeed",
        help="deepspeed: DeepSpeed's engine (ZeRO, fp16 loss scaling, any number of ranks); torch: one process on one "
        "device, plain PyTorch, bf16 autocast and each forward + backward replayed as a CUDA graph on a GPU "
        "(lxmert_fast/single_device.py); both read batch size, accumulation, precision and clipping from the "
        "DeepSpeed JSON",
    )
    group.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="with --engine torch on a GPU: launch every step eagerly instead of replaying a CUDA graph",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (with the Triton kernels on a GPU): faster steps after a minute or two of "
        "compiling (benchmarks/README.md has measurements)",
    )
    return deepspeed.add_config_arguments(parser)


def plan_engine(args, precision, world, accum) -> EnginePlan:
    """The run's EnginePlan from the flags and the DeepSpeed JSON's precision. --engine torch trains one process in
    bf16 or fp32: fp16 becomes bf16 autocast (fp16 needs loss scaling on the host at every step, which a CUDA graph
    cannot replay), and a graph needs steps without gradient accumulation (its replays overwrite the gradients)."""
    if args.engine == "deepspeed":
        return EnginePlan("deepspeed", precision, False, args.compile)
    if world > 1:
        raise SystemExit(f"--engine torch runs one process; this run has {world} ranks: use --engine deepspeed")
    if precision == "fp16":
        if not torch.cuda.is_bf16_supported():
            raise SystemExit("--engine torch trains in bf16 or fp32 and this GPU has no bf16: use --engine deepspeed")
        print0("--engine torch: the DeepSpeed config's fp16 runs as bf16 autocast, with fp32 weights")
        precision = "bf16"
    graphs = torch.cuda.is_available() and not args.no_cuda_graphs
    if graphs and accum > 1:
        print0(f"--engine torch: gradient accumulation ({accum} micro-batches) runs eagerly, without CUDA graphs")
        graphs = False
    return EnginePlan("torch", precision, graphs, args.compile)


def build_engine(plan: EnginePlan, objective, optimizer, scheduler, ds_config):
    """The engine of ``plan`` around ``objective`` (a module whose forward(batch) returns a dict of losses with the
    total under "loss"), with our optimiser and schedule. Returns (engine, the dtype batches' floats move in)."""
    if plan.engine == "torch":
        accum = batch_geometry(ds_config, 1)[1]
        engine = SingleDeviceEngine(
            objective.to(local_device()), optimizer, scheduler, device=local_device(), precision=plan.precision,
            gradient_clipping=ds_config.get("gradient_clipping", 0.0), accumulation=accum,
            cuda_graphs=plan.cuda_graphs, compile_model=plan.compile,
        )
        return engine, torch.float32  # the weights stay fp32 under bf16 autocast
    # DeepSpeed owns precision, ZeRO, clipping and accumulation
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if plan.compile:
        engine.compile()  # compiled on the first step; static shapes inside (see modeling.static_shapes_only)
    return engine, model_dtype(plan.precision)


def train_micro_batch(engine, batch, check_losses):
    """One micro-batch on either engine: losses, ``check_losses(losses)`` (returns what the caller logs, or raises,
    before anything is updated), backward, optimiser step at the accumulation boundary. Returns check's result."""
    if isinstance(engine, deepspeed.DeepSpeedEngine):
        losses = engine(batch)
        checked = check_losses(losses)
        engine.backward(losses["loss"])
    else:  # lxmert_fast.single_device: forward and backward are one CUDA graph; the update waits for the check
        losses = engine.forward_backward(batch)
        checked = check_losses(losses)
    engine.step()
    return checked


def full_parameters(engine, model):
    """Context in which ``model``'s parameters are whole on every rank (gathers them under ZeRO-3)."""
    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def model_dtype(precision):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def loss_scale(engine):
    """The current fp16 loss scale, or None when there is no loss scaling."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if value is not None and not callable(value):
            return float(value)
    return None


def graph_counters(engine) -> dict:
    """For metrics.jsonl: ``eager_steps``, the batches that ran outside ``--engine torch``'s CUDA graph so far (a
    batch over a capacity, or of another shape); nothing for an engine without a graph."""
    if isinstance(engine, SingleDeviceEngine) and engine.graphed is not None:
        return {"eager_steps": engine.eager_steps}
    return {}


# ----------------------------------------------------------------------------------------- data order, seeding
def epoch_batches(num_samples, micro_batch, seed, epoch, rank_, world, start=0):
    """The micro-batches (lists of sample indices) of one rank in one epoch, from micro-batch ``start`` on.

    A permutation that depends only on (seed, epoch), cut into global batches of ``micro_batch * world`` samples;
    rank r takes every world-th sample, so the union of the ranks' k-th micro-batches is the same set of samples
    for any world size with the same global batch. The incomplete tail is dropped so all ranks step together.
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(num_samples, generator=g).tolist()
    per_global = micro_batch * world
    n_batches = num_samples // per_global
    return [order[k * per_global + rank_ : (k + 1) * per_global : world] for k in range(start, n_batches)]


def num_micro_batches(num_samples, micro_batch, world):
    return num_samples // (micro_batch * world)


def seed_step(seed, micro_step, rank_):
    """Seed every RNG from (seed, micro-step, rank) so dropout after a resume is exactly what it would have been."""
    s = (int(seed) * 1_000_003 + int(micro_step)) * 1_009 + int(rank_)
    s %= 2**63
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def rng_state():
    """Every RNG's state as tensors, tuples and numbers only, so a checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- checkpoints
def _atomic_write(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new pointer, never half of one


def latest_tag(ckpt_dir):
    path = os.path.join(ckpt_dir, CKPT_LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    return tag if tag and os.path.isdir(os.path.join(ckpt_dir, tag)) else None


def save_checkpoint(engine, ckpt_dir, step, client_state, keep=2):
    """Save a DeepSpeed checkpoint tagged ``step{N}``; ``latest`` moves to it only once every rank has finished.

    A crash (even SIGKILL) while writing leaves ``latest`` on the previous complete checkpoint. Older checkpoints
    beyond ``keep`` are removed after the pointer has moved.
    """
    tag = f"step{step:09d}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's shard is on disk before the pointer moves
    if is_main():
        _atomic_write(os.path.join(ckpt_dir, CKPT_LATEST), tag)
        if keep:
            tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and t != tag)
            for old in tags[: max(len(tags) - (keep - 1), 0)]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()
    return tag


# The objects DeepSpeed pickles into its checkpoints besides tensors; loading allows these and nothing else.
def _deepspeed_checkpoint_classes():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_without_code(engine):
    """Make DeepSpeed read checkpoints with torch.load(weights_only=True) (it uses weights_only=False), so a
    checkpoint never executes code when loaded."""
    if engine.checkpoint_engine is None:
        engine._configure_checkpointing()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as error:  # noqa: BLE001 - torch.load raises many types; all mean "unreadable"
                raise RuntimeError(f"{path}: not a loadable checkpoint ({str(error).splitlines()[0]})") from error

    engine.checkpoint_engine.load = load


def load_checkpoint(engine, ckpt_dir):
    """Load the latest complete checkpoint into ``engine``; returns (tag, client_state) or (None, None)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None, None
    folder = os.path.join(ckpt_dir, tag)
    written_by_torch_engine = os.path.isfile(os.path.join(folder, CHECKPOINT_FILE))
    if isinstance(engine, deepspeed.DeepSpeedEngine):
        if written_by_torch_engine:
            raise RuntimeError(f"{folder} was written by --engine torch: resume it with --engine torch")
        _load_without_code(engine)  # lxmert_fast's single-device engine loads safely itself
    elif not written_by_torch_engine and os.listdir(folder):
        raise RuntimeError(f"{folder} has no {CHECKPOINT_FILE}: it was written by DeepSpeed, resume it with "
                           "--engine deepspeed")
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {os.path.join(ckpt_dir, tag)}")
    return tag, client_state


# --------------------------------------------------------------------------------------------------- metrics
class MetricsLogger:
    """metrics.jsonl (one JSON object per line, appended across resumes), TensorBoard if installed; rank 0 only."""

    def __init__(self, output_dir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.file = open(self.path, "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, record):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record and record.get("event") in (None, "valid"):
            group = "valid" if record.get("event") else "train"
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{group}/{k}", v, record["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path, step):
    """After a resume from ``step``, drop the records the killed run wrote past it (they are trained again)."""
    if not os.path.isfile(path):
        return
    keep = []
    for line in open(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if rec.get("event") in (None, "valid") and rec.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    _atomic_write(path, "".join(keep))


def progress_bar(total, initial=0, desc="train"):
    """tqdm on rank 0 (stderr), a no-op object elsewhere."""
    if is_main():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
    return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


class Timer:
    """Samples per second between two calls of ``rate``."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.samples = 0

    def add(self, n):
        self.samples += n

    def rate(self):
        now = time.perf_counter()
        r = self.samples / max(now - self.t0, 1e-9)
        self.t0, self.samples = now, 0
        return r


# ----------------------------------------------------------------------------------------- loss reduction, NaN
def reduce_losses(losses, device):
    """Average a dict of scalar losses over ranks; also says whether any rank saw a non-finite total.

    One small all-reduce per micro-step: every rank must agree to stop, or the others would hang in the next
    collective.
    """
    keys = sorted(losses)
    vec = torch.stack([losses[k].detach().float().reshape(()) for k in keys]).to(device)
    bad = (~torch.isfinite(vec)).any().float().reshape(1)
    vec = torch.cat([torch.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0), bad])
    if world_size() > 1:
        dist.all_reduce(vec)
        vec[:-1] /= world_size()
    values = vec.tolist()
    return dict(zip(keys, values[:-1], strict=True)), values[-1] > 0


def parse_args_with_config(parser, argv=None):
    """Parse ``argv``, taking defaults from the JSON file named by ``--config`` (keys are flag names; keys starting
    with "_" are comments; the command line wins). Unknown keys are an error naming the file."""
    args, _ = parser.parse_known_args(argv)
    if args.config:
        try:
            with open(args.config) as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"--config {args.config}: {error}")
        if not isinstance(loaded, dict):
            parser.error(f"--config {args.config}: expected a JSON object of flag names and values")
        defaults = {k.replace("-", "_"): v for k, v in loaded.items() if not k.startswith("_")}
        unknown = set(defaults) - {a.dest for a in parser._actions}
        if unknown:
            parser.error(f"{args.config}: unknown keys {sorted(unknown)}")
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)
