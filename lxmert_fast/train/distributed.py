"""Distributed set-up that also works as a plain single process: the process group, this rank, rank-0 printing.

Nothing here starts at import time; ``init_distributed`` is called when a run starts.
"""

import importlib
import os
import socket

import torch
import torch.distributed as dist

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
