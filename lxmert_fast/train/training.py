"""The machinery under the training loop (lxmert_fast.train.loop), the same for every task and engine.

Distributed set-up that also works as a plain single process, deterministic data sharding with a resumable
position, per-step seeding (so a resumed run is bit-for-bit the same as an uninterrupted one), the checkpoint
folder (the ``latest`` pointer, rotation, a write that fails keeps the last good checkpoint), the metrics writer
(metrics.jsonl, TensorBoard when installed, tqdm on rank 0) and the non-finite-loss guard.
"""

import importlib
import json
import os
import random
import shutil
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from lxmert_fast.data import to_device  # noqa: F401  (the loop calls training.to_device)
from lxmert_fast.errors import CheckpointError
from lxmert_fast.files import write_text

CKPT_LATEST = "latest"
METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------------- distributed
_SELF_RENDEZVOUS = "LXMERT_FAST_SINGLE_PROCESS_PORT"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Initialise torch.distributed through DeepSpeed; a plain ``python script.py`` becomes a world of one.

    Without CUDA, DeepSpeed is told to use its CPU accelerator (DS_ACCELERATOR) before it is first imported, so it
    does not probe for other devices; done here, when a run starts, not as a side effect of an import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

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


def main_first(build):
    """``build()`` on rank 0 first (it may convert feature files to stores), then on the other ranks, which find
    the work done."""
    if is_main():
        result = build()
    barrier()
    if not is_main():
        result = build()
    return result


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


def eval_batches(num_samples, micro_batch, rank_, world, limit=None, seed=None):
    """One rank's evaluation micro-batches over all ``num_samples`` (the last one partial, never dropped), in a fixed
    order (shuffled by ``seed`` when given), at most ``limit`` per rank. Every rank gets as many batches (ZeRO-3
    gathers parameters in every forward): a rank short of samples repeats the first ones."""
    order = list(range(num_samples))
    if seed is not None:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed))).tolist()
    padded = order + order[: -num_samples % world] if num_samples else []
    mine = padded[rank_::world]
    batches = [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
    return batches if limit is None else batches[:limit]


def atomic_write(path, text):
    write_text(path, text)


def checkpoint_tag(step):
    return f"step{step:09d}"


def latest_tag(ckpt_dir):
    """The tag ``latest`` points to, or None when there is no pointer. A pointer to a missing folder is an error:
    the checkpoints beside it may be complete, and starting afresh would rotate them away."""
    path = os.path.join(ckpt_dir, CKPT_LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not tag or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        others = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step"))
        raise CheckpointError(
            f"{path} points to {tag!r}, which is not in {ckpt_dir} (it holds {others or 'no checkpoint'}); "
            "point it at a complete checkpoint, or start afresh with --overwrite"
        )
    return tag


def save_checkpoint(engine, ckpt_dir, step, client_state, keep=2, describe=None):
    """Save the engine's checkpoint tagged ``step{N}``; ``latest`` moves to it only once every rank has finished.

    A crash (even SIGKILL) while writing leaves ``latest`` on the previous complete checkpoint; a write that fails
    (a full disk) removes the partial folder and raises CheckpointError naming it and the cause. After the pointer
    has moved, checkpoints beyond ``keep`` are removed: never the new one, and the newest first kept.
    ``describe(folder)``, on rank 0, adds what the engine does not write (the model's config and tokenizer).
    """
    tag = checkpoint_tag(step)
    folder = os.path.join(ckpt_dir, tag)
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        engine.save(ckpt_dir, tag, client_state)
        if describe is not None and is_main():
            describe(folder)
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)
        kept = _pointer(ckpt_dir)
        raise CheckpointError(
            f"could not write checkpoint {folder}: {error.strerror or error}; "
            + (f"the last good checkpoint {os.path.join(ckpt_dir, kept)} is kept" if kept else "no checkpoint kept")
        ) from error
    barrier()  # every rank's shard is on disk before the pointer moves
    if is_main():
        atomic_write(os.path.join(ckpt_dir, CKPT_LATEST), tag)
        _rotate(ckpt_dir, tag, keep)
    barrier()
    return tag


def _pointer(ckpt_dir):
    path = os.path.join(ckpt_dir, CKPT_LATEST)
    return open(path).read().strip() if os.path.isfile(path) else None


def _rotate(ckpt_dir, current, keep):
    """Keep ``current`` and the ``keep - 1`` newest checkpoints before it; tags after it (left by a killed run
    that this one resumed before) are stale and go too."""
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and os.path.isdir(os.path.join(ckpt_dir, t)))
    older = [t for t in tags if t < current]
    stale = [t for t in tags if t > current] + older[: max(len(older) - (keep - 1), 0)]
    for tag in stale:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def load_checkpoint(engine, ckpt_dir):
    """Load the latest complete checkpoint into ``engine``; returns (tag, client_state) or (None, None)."""
    tag = latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if tag is None:
        return None, None
    return tag, engine.load(ckpt_dir, tag)


# --------------------------------------------------------------------------------------------------- metrics
class MetricsLogger:
    """metrics.jsonl (one JSON object per line, each with an ``event``: train, eval or end), TensorBoard if
    installed (train/ and eval/); rank 0 only."""

    def __init__(self, output_dir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.file = None  # opened at the first record: a resumed run cuts the file back first
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
        if self.file is None:
            self.file = open(self.path, "a")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and record.get("event") in ("train", "eval"):
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path, step):
    """On a resume from ``step`` (0: no checkpoint was written), drop the records the killed run wrote past it
    (they are trained again) and its end record."""
    if not os.path.isfile(path):
        return
    keep = []
    for line in open(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if rec.get("event") in ("train", "eval") and rec.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, "".join(keep))


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
