"""Resume a DeepSpeed ZeRO checkpoint on another number of ranks: the optimiser state resharded.

ZeRO 1-3 split the fp32 weights and the optimiser state into one partition per rank, and DeepSpeed loads them
only on the rank count that wrote them. Here every rank reads all the old partitions (with ``safe_load``: no code
from the file runs) and puts them together into whole fp32 tensors per parameter (``consolidate``), then gives
each parameter's whole weight and state to DeepSpeed's own setters (``apply``), which cut out this rank's part in
the new layout. Why not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal``): it writes a
second full copy of the checkpoint and reads its files with ``torch.load(weights_only=False)``; the layouts read
here are the two that DeepSpeed 0.19 writes, and a checkpoint that does not add up is an error naming it.

ZeRO-0 needs none of this: its optimiser state is whole in the model-states file, which any rank count loads.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from lxmert_fast.errors import CheckpointError

STATE_KEYS = ("exp_avg", "exp_avg_sq")  # the optimisers' (BertAdam, AdamW) per-element state
# what DeepSpeed keeps in a model-states file besides the client state
DEEPSPEED_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "checkpoint_parallel_dimensions", "ds_config", "ds_version",
})
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def partition_files(folder) -> list[str]:
    """The ZeRO optimiser partitions in ``folder``, in rank order; a gap in the ranks is a CheckpointError."""
    found = {}
    for name in os.listdir(folder):
        match = _OPTIM_FILE.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{folder}: optimiser partitions of ranks {sorted(found)}; some rank's file is missing")
    return [found[r] for r in range(len(found))]


@dataclass
class Consolidated:
    """A ZeRO checkpoint put together: whole fp32 tensors by parameter name, and what is not partitioned."""

    fp32: dict
    states: dict  # {"exp_avg": {name: tensor}, ...}
    step: object  # an int (BertAdam) or a tensor (torch AdamW)
    param_groups: list  # the optimiser's hyper-parameters (lr, betas, ...) per group, without params
    global_state: dict  # rank 0's loss scaler and friends
    model_states: dict  # rank 0's model-states file: the schedule, counters, buffers and the client state
    ranks: int  # how many ranks wrote it


def consolidate(folder) -> Consolidated:
    from lxmert_fast.model.folder import DEEPSPEED_MODEL_FILE, ZERO3_MODEL_FILE
    from lxmert_fast.train.engines import safe_load

    files = partition_files(folder)
    parts = [safe_load(path, map_location="cpu")["optimizer_state_dict"] for path in files]
    stage3 = "fp32_flat_groups" in parts[0]
    model_file = os.path.join(folder, ZERO3_MODEL_FILE.format(rank=0) if stage3 else DEEPSPEED_MODEL_FILE)
    model_states = safe_load(model_file, map_location="cpu")
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    base = [p["optimizer_state_dict"] if stage3 else p["base_optimizer_state"] for p in parts]
    try:
        join = _join_stage3 if stage3 else _join_stage12
        fp32, states = join(parts, base, shapes)
    except (KeyError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: the ZeRO partitions do not add up to the model's parameters "
                              f"({type(error).__name__}: {error})") from error
    for name, shape in shapes.items():
        if fp32[name].numel() != math.prod(shape):
            raise CheckpointError(f"{folder}: {name} has {fp32[name].numel()} elements in the ZeRO partitions, "
                                  f"its shape {tuple(shape)} needs {math.prod(shape)}")
    global_state = {k: v for k, v in parts[0].items() if k in ("loss_scaler", "dynamic_loss_scale", "overflow")}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base[0]["param_groups"]]
    return Consolidated({n: fp32[n].view(shapes[n]) for n in shapes},
                        {k: {n: v[n].view(shapes[n]) for n in shapes} for k, v in states.items()},
                        base[0]["state"][0]["step"], groups, global_state, model_states, len(parts))


def _join_stage12(parts, base, shapes):
    """ZeRO 1/2: each rank's flat fp32 partition per group, with the slice of every parameter it holds."""
    pieces = {key: {} for key in ("fp32", *STATE_KEYS)}
    for part, opt in zip(parts, base, strict=True):
        for g, mapping in enumerate(part["param_slice_mappings"]):
            flats = {"fp32": part["single_partition_of_fp32_groups"][g],
                     **{key: opt["state"][g][key] for key in STATE_KEYS}}
            for name, where in mapping.items():
                for key, flat in flats.items():
                    pieces[key].setdefault(name, []).append(flat.narrow(0, where.start, where.numel))
    whole = {key: {name: torch.cat(p) for name, p in by_name.items()} for key, by_name in pieces.items()}
    return whole.pop("fp32"), whole


def _join_stage3(parts, base, shapes):
    """ZeRO-3: every parameter cut into ``ranks`` equal parts (the last padded), each rank's parts in the order of
    the parameters, its sub-groups one after the other."""
    ranks = len(parts)
    flats = {"fp32": [torch.cat(list(p["fp32_flat_groups"])) for p in parts],
             **{key: [torch.cat([opt["state"][g][key] for g in sorted(opt["state"])]) for opt in base]
                for key in STATE_KEYS}}
    whole, offset = {key: {} for key in flats}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        share = math.ceil(numel / ranks)
        for key, per_rank in flats.items():
            whole[key][name] = torch.cat([flat.narrow(0, offset, share) for flat in per_rank])[:numel]
        offset += share
    return whole.pop("fp32"), whole


def apply(engine, saved: Consolidated) -> dict:
    """Put ``saved`` into the DeepSpeed ``engine`` (ZeRO stage 1-3, any rank count); returns the client state.

    This rank's flat fp32 partitions and their optimiser state are filled from the whole tensors as DeepSpeed's own
    universal-checkpoint loader fills them (the state is created here: DeepSpeed makes it at the first step), then
    the module's weights are set from the fp32 partitions."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    missing = sorted(set(names.values()) - set(saved.fp32))
    if missing:
        raise CheckpointError(f"the checkpoint has no {', '.join(missing[:3])}: it was written for another model")
    zero = engine.optimizer
    stage3 = engine.zero_optimization_partition_weights()
    layout = ("fp32_partitioned_groups_flat", "fp16_groups") if stage3 else ("single_partition_of_fp32_groups",
                                                                            "bit16_groups")
    if not all(hasattr(zero, name) for name in layout):  # e.g. DeepSpeed's BF16_Optimizer (bf16 with ZeRO-1)
        raise CheckpointError(f"a checkpoint of {saved.ranks} ranks is resharded for DeepSpeed's ZeRO optimiser, not "
                              f"{type(zero).__name__}: resume with {saved.ranks} ranks")
    flats = zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups
    lp_groups = zero.fp16_groups if stage3 else zero.bit16_groups
    for flat, params in zip(flats, lp_groups, strict=True):
        parts = {key: torch.zeros_like(flat) for key in ("fp32", *STATE_KEYS)}
        for param, (src, dst, numel) in _local_slices(params, stage3, engine.dp_world_size, engine.global_rank):
            for key, part in parts.items():
                whole = (saved.fp32 if key == "fp32" else saved.states[key])[names[id(param)]].flatten()
                part.narrow(0, dst, numel).copy_(_padded(whole, src + numel).narrow(0, src, numel))
        flat.data.copy_(parts.pop("fp32"))
        step = saved.step.clone() if torch.is_tensor(saved.step) else saved.step
        zero.optimizer.state[flat] = {"step": step, **parts}
    if stage3:
        for flat, params in zip(flats, lp_groups, strict=True):
            for param, (_, start, share) in _local_slices(params, True, engine.dp_world_size, engine.global_rank):
                param.ds_tensor.data.copy_(flat.data.narrow(0, start, share))  # the partitions the forward gathers
    else:
        zero.update_lp_params()  # the module's weights from the fp32 partitions, gathered
    _restore_counters(engine, saved)
    return {k: v for k, v in saved.model_states.items() if k not in DEEPSPEED_KEYS}


def _local_slices(params, stage3, world, rank):
    """(param, (start in the whole flattened parameter, start in this rank's flat partition, numel)) for each
    parameter with elements on this rank."""
    if not stage3:  # ZeRO 1/2: DeepSpeed's fragment map of each parameter into this rank's partition
        for param in params:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                yield param, (lp.start, hp.start, lp.numel)
        return
    offset = 0  # ZeRO-3: every parameter's equal share, one after the other
    for param in params:
        share = param.ds_tensor.numel()
        yield param, (share * rank, offset, share)
        offset += share


def _padded(tensor, size):
    return torch.nn.functional.pad(tensor, (0, max(size - tensor.numel(), 0)))


def _restore_counters(engine, saved):
    """The optimiser's step and hyper-parameters, the schedule, the engine's counters, the loss scaler, buffers."""
    base = engine.optimizer.optimizer  # ours (BertAdam, AdamW), under DeepSpeed's ZeRO wrapper
    for group in base.param_groups:
        group.update(saved.param_groups[0])  # one group: weight decay is on every parameter
    for key, value in saved.global_state.items():
        if hasattr(engine.optimizer, key):
            setattr(engine.optimizer, key, value)
    states = saved.model_states
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps, engine.skipped_steps = states["global_steps"], states["skipped_steps"]
    engine.global_samples = states.get("global_samples", engine.global_steps * engine.train_batch_size())
    buffers = {k: v for k, v in (states.get("module") or {}).items() if k in set(states.get("buffer_names") or ())}
    if buffers:
        engine.module.load_state_dict(buffers, strict=False)
