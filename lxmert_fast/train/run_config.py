"""The run's configuration, resolved once: command line + ``--config`` JSON + DeepSpeed JSON + model preset.

``resolve`` reads and checks everything a run is told, makes every adjustment to the machine in one place (fp16 ->
fp32 without CUDA, fp16 -> bf16 for ``--engine torch``, ``--micro-batch-size`` written into the DeepSpeed config,
DeepSpeed's ``"auto"`` values filled in as transformers' Trainer fills them) and returns a frozen
``RunConfig`` of typed sections (run, optimisation, engine; the script's data and task), which the run prints once
and saves as ``run_config.json`` in its output folder. A resumed run is compared with the saved one: what would
change the data order or the model (seed, batch geometry, ranks, model config) must be the same.

Nothing heavy is imported here (no torch at import time): ``--help`` and a bad flag answer at once, before
DeepSpeed starts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lxmert_fast.errors import ConfigError, JSONFileError

RUN_CONFIG_FILE = "run_config.json"
MICRO, ACCUM, TOTAL = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"


# ----------------------------------------------------------------------------------------------------- files
def find_config(name_or_path: str) -> str:
    """A config file: a path, or the name of one shipped with the package (``lxmert_small``, ``ds_zero2_fp16.json``;
    a recipe's ``configs/NAME.json`` also outside a checkout)."""
    from lxmert_fast.resources import find_config as find_shipped

    try:
        return str(find_shipped(name_or_path))
    except FileNotFoundError as error:
        folder, name = os.path.split(str(name_or_path))
        if folder == "configs":
            with contextlib.suppress(FileNotFoundError):
                return str(find_shipped(name))
        raise ConfigError(str(error)) from None


def read_json(path: str, what: str):
    """The JSON in ``path``; a file that is not JSON is an error naming the file, line and column and ``what``
    the file should hold."""
    from lxmert_fast import files  # the one JSON reader; its errors become ConfigErrors here

    try:
        return files.read_json(path, what)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from error
    except OSError as error:
        raise ConfigError(f"{path}: cannot read {what} ({error.strerror})") from error
    except JSONFileError as error:
        raise ConfigError(str(error)) from error


# ------------------------------------------------------------------------------------------ shared flags
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def add_training_arguments(parser, *, output_dir, save_every, log_every=10, workers="min(8, cores/2)"):
    """The flags of the loop, the schedule and the engine, shared by pretrain.py and finetune.py."""
    run = parser.add_argument_group("run: output, checkpoints, logging")
    run.add_argument("--output-dir", default=output_dir,
                     help="metrics, checkpoints, run_config.json and the saved models" + (
                         "" if output_dir else " (default: output/finetune_TASK)"))
    run.add_argument("--seed", type=int, default=9595, help="data order, masking, dropout and initial weights")
    run.add_argument("--epochs", type=int, default=None, help="training epochs (default: the task's)")
    run.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimiser steps")
    run.add_argument("--save-every", type=positive_int, default=save_every,
                     help="checkpoint every N optimiser steps" + ("" if save_every else " (default: epoch ends)"))
    run.add_argument("--keep-checkpoints", type=positive_int, default=2, help="the newest N checkpoints are kept")
    run.add_argument("--log-every", type=positive_int, default=log_every,
                     help="a metrics.jsonl record every N optimiser steps")
    run.add_argument("--num-workers", type=int, default=None, help=f"data-loader workers (default: {workers})")
    run.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in an OUTPUT_DIR that holds another run (its metrics and checkpoints go)")
    run.add_argument("--process-group-timeout", type=positive_float, default=None, metavar="SECONDS",
                     help="how long a rank waits for the others in a collective before the run stops with an error "
                     "(a frozen or dead rank); default: $LXMERT_FAST_PG_TIMEOUT, else 1800")
    run.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    opt = parser.add_argument_group("optimiser")
    opt.add_argument("--optimizer", choices=("bertadam", "adamw"), default="bertadam",
                     help="bertadam: the original's Adam without bias correction (fine-tuning on the sample data "
                     "without a starting point: adamw, unless given)")
    opt.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the task's)")
    opt.add_argument("--weight-decay", type=float, default=0.01, help="decoupled, on every parameter")
    opt.add_argument("--warmup", type=float, default=None, help="warm-up fraction of the steps (default: the task's)")
    engine = parser.add_argument_group("engine and batch")
    engine.add_argument(
        "--engine", choices=("deepspeed", "torch"), default="deepspeed",
        help="deepspeed: DeepSpeed's engine (ZeRO, fp16 loss scaling, any number of ranks); torch: one process on "
        "one device, plain PyTorch, bf16 autocast and the step replayed as a CUDA graph on a GPU; both read batch "
        "size, accumulation, precision and clipping from the DeepSpeed JSON",
    )
    engine.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                        help="DeepSpeed JSON (a path or the name of one in configs/; default: the task's)")
    engine.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's launcher; no effect")
    engine.add_argument("--micro-batch-size", type=positive_int, default=None,
                        help="override the DeepSpeed JSON's train_micro_batch_size_per_gpu")
    engine.add_argument("--gradient-accumulation", type=positive_int, default=None,
                        help="override the DeepSpeed JSON's gradient_accumulation_steps")
    engine.add_argument("--no-cuda-graphs", action="store_true",
                        help="with --engine torch on a GPU: launch every step eagerly instead of replaying a graph")
    engine.add_argument("--compile", action="store_true",
                        help="torch.compile the model (with the Triton kernels on a GPU)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the description's layout."""


def make_parser(description):
    parser = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    parser.add_argument("--config", help="JSON file of values for any of these flags (the command line wins)")
    return parser


def parse_args_with_config(parser, argv=None) -> tuple[dict, frozenset]:
    """Parse ``argv``, taking defaults from the JSON file named by ``--config`` (keys are flag names; keys starting
    with "_" are comments; the command line wins). Unknown keys are an error naming the file. Returns the flags'
    values and the names of those given (on the command line or in the file), so a script can tell a default from
    the same value given."""
    args, _ = parser.parse_known_args(argv)
    given = set()
    if args.config:
        try:
            loaded = read_json(args.config, "a JSON object of flag names and values")
        except ConfigError as error:
            parser.error(str(error))
        if not isinstance(loaded, dict):
            parser.error(f"--config {args.config}: expected a JSON object of flag names and values")
        defaults = {k.replace("-", "_"): v for k, v in loaded.items() if not k.startswith("_")}
        unknown = set(defaults) - {a.dest for a in parser._actions}
        if unknown:
            parser.error(f"{args.config}: unknown keys {sorted(unknown)}")
        parser.set_defaults(**defaults)
        given |= set(defaults)
    flags = vars(parser.parse_args(argv))
    return flags, frozenset(given | _given_on_command_line(parser, argv))


def _given_on_command_line(parser, argv):
    """The flags ``argv`` gives: parsed once more into a namespace that already holds a marker for every flag,
    which argparse keeps where no value is given."""
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed, _ = parser.parse_known_args(argv, namespace=probe)
    return {name for name, value in vars(parsed).items() if value is not unset}


def check_files(flags: dict, names) -> None:
    """Every comma-separated path of the flags ``names`` exists (hub names aside: a tokenizer may be one); the
    error lists every missing one, and the download command that fetches them where they are release files."""
    missing = []
    for name in names:
        value = flags.get(name)
        for path in ([] if value is None else value if isinstance(value, (list, tuple)) else str(value).split(",")):
            if path and not os.path.exists(path):
                missing.append((f"--{name.replace('_', '-')}", path))
    if missing:
        from lxmert_fast.data.download import download_hint

        listed = "; ".join(f"{flag} {path}" for flag, path in missing)
        raise ConfigError(f"no such file or folder: {listed}{download_hint([path for _, path in missing])}")


# ---------------------------------------------------------------------------------------------- the sections
def section(cls, flags: dict):
    """The dataclass ``cls`` filled from the flags of its fields' names; a flag not there keeps the default."""
    return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})


@dataclass(frozen=True)
class RunSettings:
    """Where a run writes, how long it trains, how often it logs and checkpoints."""

    output_dir: str = "output"
    seed: int = 9595
    epochs: int = 0
    max_steps: int | None = None
    save_every: int | None = None  # None: at epoch ends only
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int | None = None  # None: the loop's default for this machine
    resume: bool = False
    overwrite: bool = False
    process_group_timeout: float = 1800.0  # seconds a collective waits (lxmert_fast.train.distributed)


@dataclass(frozen=True)
class Optimisation:
    optimizer: str = "bertadam"  # bertadam | adamw
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of the steps


@dataclass(frozen=True)
class EngineSettings:
    """The engine and the batch, resolved from the flags and the DeepSpeed JSON; ``deepspeed`` is that JSON exactly
    as DeepSpeed gets it, for deepspeed.initialize only: everything else reads the typed fields."""

    name: str = "deepspeed"  # deepspeed | torch
    precision: str = "fp32"  # fp16 | bf16 | fp32
    micro_batch: int = 1
    accumulation: int = 1
    world_size: int = 1
    gradient_clipping: float = 0.0  # 0: none
    zero_stage: int = 0
    cuda_graphs: bool = False
    compile: bool = False
    deepspeed_file: str = ""
    deepspeed: dict = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def model_backend(self) -> str:
        """Compiled or graphed on a GPU: the fused kernels, chosen up front; eagerly: "auto" (the plain path)."""
        import torch

        return "triton" if (self.compile or self.cuda_graphs) and torch.cuda.is_available() else "auto"

    def deepspeed_config(self) -> dict:
        return copy.deepcopy(self.deepspeed)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run was told, resolved, in sections. ``data`` and ``task`` are the script's own sections
    (lxmert_fast.train.pretrain_run, lxmert_fast.finetune); ``model`` the model config's fields for a model built
    from a config (None: from a checkpoint)."""

    script: str
    run: RunSettings
    optimisation: Optimisation
    engine: EngineSettings
    data: Any = None
    task: Any = None
    model: dict | None = None
    adjustments: tuple[str, ...] = ()

    def summary(self) -> str:
        engine = self.engine
        how = "DeepSpeed" if engine.name == "deepspeed" else "plain PyTorch"
        if engine.name == "deepspeed":
            how += f" ZeRO-{engine.zero_stage}"
        how += ", CUDA graphs" if engine.cuda_graphs else ""
        how += ", compiled" if engine.compile else ""
        lines = [
            f"run config ({self.script}): {how}, {engine.precision}, micro-batch {engine.micro_batch} x accumulation "
            f"{engine.accumulation} x {engine.world_size} rank(s) = {engine.global_batch}, seed {self.run.seed}, "
            f"DeepSpeed JSON {engine.deepspeed_file}"
        ]
        lines += [f"  adjusted: {note}" for note in self.adjustments]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    def check_resume(self, saved: dict, source: str) -> None:
        """A resumed run must read the data in the same order into the same model: compare with ``saved`` (the
        run_config.json of the run being resumed, read from ``source``). The rank count may change, the global batch
        (micro-batch x accumulation x ranks) may not: the samples of each optimiser step stay the same."""
        ours, theirs = _identity(json.loads(self.to_json())), _identity(saved)
        differences = []
        for name in ours:
            a, b = ours[name], theirs.get(name)
            if a == b or (name == "model" and (a is None or b is None)):
                continue
            if name == "model":  # only the fields that differ
                changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                a, b = ({k: d.get(k) for k in changed} for d in (a, b))
            if name == "global_batch":
                differences.append(_global_batch_difference(self.engine, saved, source))
                continue
            differences.append(f"{name} is {a}, the run in {source} had {b}")
        if differences:
            raise ConfigError(
                f"--resume: this run's {'; '.join(differences)}; resume with the same settings, or start a new run "
                "with --overwrite or another --output-dir"
            )


def _identity(saved: dict) -> dict:
    """What a resumed run must share with the run it resumes, from a run_config.json: in sections, or flat with a
    ``flags`` dict as written before the sections."""
    if "flags" in saved:
        seed, engine = saved["flags"].get("seed"), saved
    else:
        seed, engine = saved.get("run", {}).get("seed"), saved.get("engine", {})
    batch = [engine.get(name) for name in ("micro_batch", "accumulation", "world_size")]
    global_batch = None if None in batch else batch[0] * batch[1] * batch[2]
    return {"seed": seed, "global_batch": global_batch, "model": saved.get("model")}


def _geometry(engine: dict) -> str:
    return (f"{engine.get('micro_batch')} x accumulation {engine.get('accumulation')} x {engine.get('world_size')} "
            "rank(s)")


def _global_batch_difference(engine: EngineSettings, saved: dict, source: str) -> str:
    """Why the global batch differs, and the numbers that would keep it."""
    theirs = saved if "flags" in saved else saved.get("engine", {})
    target = _identity(saved)["global_batch"]
    text = (f"global batch is {engine.global_batch} (micro-batch {_geometry(asdict(engine))}), the run in {source} "
            f"had {target} (micro-batch {_geometry(theirs)})")
    kept = keep_global_batch(target, engine.micro_batch, engine.world_size)
    if kept is None:
        fits = [str(w) for w in range(1, target + 1) if target % w == 0]
        return text + (f": {target} samples do not split over {engine.world_size} ranks; resume on "
                       f"{', '.join(fits)} ranks")
    return text + f": keep it with --micro-batch-size {kept[0]} --gradient-accumulation {kept[1]}"


def keep_global_batch(target: int, micro: int, world: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation) that make the global batch ``target`` on ``world`` ranks: the micro-batch kept
    when it divides, else the largest that does below it (no more memory per rank); None when ``target`` samples
    do not split over the ranks."""
    if target % world:
        return None
    per_rank = target // world
    fitting = max(m for m in range(1, min(micro, per_rank) + 1) if per_rank % m == 0)
    return fitting, per_rank // fitting


def saved_global_batch(flags: dict) -> int | None:
    """With --resume: the global batch of the run in --output-dir (its run_config.json), else None."""
    out = flags.get("output_dir")
    path = os.path.join(out, RUN_CONFIG_FILE) if flags.get("resume") and out else None
    if path is None or not os.path.isfile(path):
        return None
    return _identity(read_json(path, "a run config (run_config.json)"))["global_batch"]


def resolve(script: str, flags: dict, *, default_deepspeed: str, model: dict | None = None, data=None, task=None,
            world_size: int | None = None, notes: tuple[str, ...] = ()) -> RunConfig:
    """The RunConfig of ``flags`` (the parsed flags, data paths filled in) and the script's ``data`` and ``task``
    sections. World size from the launcher (WORLD_SIZE, or an MPI launcher's or srun's variables; 1 for a plain
    process). ``notes``: the script's own
    adjustments, printed with the others."""
    import torch

    from lxmert_fast.train.distributed import default_pg_timeout, launched_world_size

    cuda = torch.cuda.is_available()
    world = launched_world_size() if world_size is None else world_size
    if flags.get("process_group_timeout") is None:
        flags = {**flags, "process_group_timeout": default_pg_timeout()}
    ds_file = find_config(flags.get("deepspeed_config") or default_deepspeed)
    raw = read_json(ds_file, "a DeepSpeed config (a JSON object)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{ds_file}: expected a DeepSpeed config (a JSON object), got {type(raw).__name__}")
    notes = list(notes)
    ds = resolve_deepspeed(raw, ds_file, flags, world, cuda, model, notes)
    precision = "fp16" if ds.get("fp16", {}).get("enabled") else "bf16" if ds.get("bf16", {}).get("enabled") else "fp32"
    name, graphs = flags.get("engine", "deepspeed"), False
    if name == "torch":
        precision, graphs = _plan_torch_engine(precision, world, cuda, flags, ds[ACCUM], notes)
    engine = EngineSettings(
        name=name, precision=precision, micro_batch=ds[MICRO], accumulation=ds[ACCUM], world_size=world,
        gradient_clipping=float(ds.get("gradient_clipping") or 0.0),
        zero_stage=int(ds.get("zero_optimization", {}).get("stage", 0)), cuda_graphs=graphs,
        compile=bool(flags.get("compile")), deepspeed_file=ds_file, deepspeed=ds,
    )
    return RunConfig(script=script, run=section(RunSettings, flags), optimisation=section(Optimisation, flags),
                     engine=engine, data=data, task=task, model=model, adjustments=tuple(notes))


def _plan_torch_engine(precision, world, cuda, flags, accum, notes):
    """--engine torch trains one process in bf16 or fp32; a CUDA graph needs steps without accumulation."""
    import torch

    if world > 1:
        raise ConfigError(f"--engine torch runs one process; this run has {world} ranks: use --engine deepspeed")
    if precision == "fp16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("--engine torch trains in bf16 or fp32 and this GPU has no bf16: use --engine deepspeed")
        notes.append("--engine torch: the DeepSpeed config's fp16 runs as bf16 autocast, with fp32 weights")
        precision = "bf16"
    graphs = cuda and not flags.get("no_cuda_graphs")
    if graphs and accum > 1:
        notes.append(f"--engine torch: gradient accumulation ({accum} micro-batches) runs eagerly, without CUDA graphs")
        graphs = False
    return precision, graphs


# ------------------------------------------------------------------------------------------ the DeepSpeed JSON
def resolve_deepspeed(raw: dict, source: str, flags: dict, world: int, cuda: bool, model: dict | None,
                      notes: list) -> dict:
    """The DeepSpeed JSON ``raw`` (from ``source``) as this run gives it to DeepSpeed: "auto" filled in, the batch
    flags applied, the three batch keys consistent for ``world`` ranks, fp16 off without CUDA, and what our own
    optimiser needs. Each change is appended to ``notes``."""
    cfg = copy.deepcopy(raw)
    for key in ("optimizer", "scheduler"):
        if key in cfg:  # the optimiser and schedule are ours (BertAdam, warm-up + linear decay)
            raise ConfigError(f"{source}: remove '{key}'; the optimiser and schedule are set by --optimizer/--lr")
    _fill_auto(cfg, source, flags, cuda, (model or {}).get("hidden_size", 768), notes)
    for key, flag in ((MICRO, "micro_batch_size"), (ACCUM, "gradient_accumulation")):
        if flags.get(flag) is not None and cfg.get(key) != flags[flag]:
            notes.append(f"{key} {cfg.get(key)} -> {flags[flag]} (--{flag.replace('_', '-')})")
            cfg[key] = flags[flag]
            cfg.pop(TOTAL, None)  # follows from the overridden keys
    micro, accum = batch_geometry(cfg, world, source)
    target = saved_global_batch(flags)
    kept = keep_global_batch(target, micro, world) if target and micro * accum * world != target else None
    if kept and (flags.get("gradient_accumulation") is not None
                 or (flags.get("micro_batch_size") is not None and kept[0] != micro)):
        kept = None  # the numbers given win (check_resume refuses them if they change the global batch)
    if kept:  # --resume on another rank count: the resumed run's global batch, kept
        changed = [f"{key} {a} -> {b}" for key, a, b in ((MICRO, micro, kept[0]), (ACCUM, accum, kept[1])) if a != b]
        notes.append(f"{', '.join(changed)}: the global batch {target} of the resumed run, on {world} rank(s)")
        micro, accum = kept
    cfg.update({MICRO: micro, ACCUM: accum, TOTAL: micro * accum * world})
    if cfg.get("fp16", {}).get("enabled") and not cuda:
        cfg["fp16"] = {**cfg["fp16"], "enabled": False}
        notes.append("no CUDA device: fp16 is not available, training in fp32 instead")
    if not cfg.get("zero_allow_untested_optimizer"):
        cfg["zero_allow_untested_optimizer"] = True  # our BertAdam is passed to DeepSpeed as a client optimiser
        notes.append("zero_allow_untested_optimizer true (the run passes its own optimiser, BertAdam or AdamW)")
    return cfg


def _fill_auto(cfg, source, flags, cuda, hidden, notes):
    """DeepSpeed's "auto" values, filled as transformers' Trainer fills them from its arguments."""
    fills = {
        (MICRO,): flags.get("micro_batch_size"),
        (ACCUM,): flags.get("gradient_accumulation") or 1,
        (TOTAL,): None,  # follows from the two above
        ("gradient_clipping",): 1.0,
        ("fp16", "enabled"): cuda,  # our default precision on a GPU
        ("bf16", "enabled"): False,
        ("zero_optimization", "reduce_bucket_size"): hidden * hidden,
        ("zero_optimization", "stage3_prefetch_bucket_size"): int(0.9 * hidden * hidden),
        ("zero_optimization", "stage3_param_persistence_threshold"): 10 * hidden,
    }
    for keys, value in fills.items():
        parent = cfg
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent.get(key), dict) else {}
        if parent.get(keys[-1]) != "auto":
            continue
        if keys == (MICRO,) and value is None:
            raise ConfigError(f"{source}: {MICRO} is \"auto\": give --micro-batch-size")
        if value is None:
            del parent[keys[-1]]
        else:
            parent[keys[-1]] = value
        notes.append(f"{'.'.join(keys)} \"auto\" -> {value if value is not None else 'derived'}")
    leftover = [path for path in _auto_paths(cfg)]
    if leftover:
        raise ConfigError(f"{source}: no value to fill in for \"auto\" at {', '.join(leftover)}")


def _auto_paths(cfg, prefix=""):
    for key, value in cfg.items():
        if value == "auto":
            yield prefix + key
        elif isinstance(value, dict):
            yield from _auto_paths(value, f"{prefix}{key}.")


def batch_geometry(cfg: dict, world: int, source: str = "DeepSpeed config") -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) as DeepSpeed derives them from any two of the three batch keys;
    a contradiction, a value below 1 or a batch that does not divide is an error naming the values."""
    micro, accum, total = cfg.get(MICRO), cfg.get(ACCUM), cfg.get(TOTAL)
    for key, value in ((MICRO, micro), (ACCUM, accum), (TOTAL, total)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{source}: {key} is {value!r}; it must be a whole number, 1 or more")
    if micro is None and total is None:
        raise ConfigError(f"{source}: set {MICRO} (and {ACCUM}) or {TOTAL}")
    if micro is None:
        accum = accum or 1
        micro = total // (accum * world)
        if micro < 1 or micro * accum * world != total:
            raise ConfigError(f"{source}: {TOTAL} {total} does not split into {accum} accumulation step(s) x "
                              f"{world} rank(s)")
    elif accum is None:
        accum = max(total // (micro * world), 1) if total else 1
    if total is not None and micro * accum * world != total:
        raise ConfigError(
            f"{source}: {TOTAL} {total} != {MICRO} {micro} x {ACCUM} {accum} x {world} rank(s) = "
            f"{micro * accum * world}; give two of the three, or make them agree"
        )
    return micro, accum
