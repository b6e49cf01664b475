"""Distributed set-up that also works as a plain single process: the process group, this rank, rank-0 printing.

Any launcher starts a run: deepspeed and torchrun set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
themselves; for mpirun (Open MPI's OMPI_COMM_WORLD_*, MPICH's and Intel MPI's PMI_*) and srun (SLURM_*) the
launcher's own variables are read into those (``launcher_ranks``). Without any, a process is a world of one.
The process group waits at most ``--process-group-timeout`` seconds (or LXMERT_FAST_PG_TIMEOUT) for a collective,
so a rank that froze or died ends the run in bounded time.

Nothing here starts at import time; ``init_distributed`` is called when a run starts.
"""

import datetime
import gc
import importlib
import os
import re
import secrets
import socket
import sys

import torch
import torch.distributed as dist

from lxmert_fast.errors import ConfigError

_SELF_RENDEZVOUS = "LXMERT_FAST_SINGLE_PROCESS_PORT"
PG_TIMEOUT_ENV = "LXMERT_FAST_PG_TIMEOUT"
DEFAULT_PG_TIMEOUT_S = 1800.0  # torch's own default (DeepSpeed's is 10 minutes)
DEFAULT_MASTER_PORT = "29500"  # torchrun's and deepspeed's default

# (launcher, its rank, world size and local-rank variables); the first whose rank variable is set wins
LAUNCHERS = (
    ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpirun (MPICH / Intel MPI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("srun (Slurm)", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
)


def default_pg_timeout() -> float:
    """Seconds a collective may wait: LXMERT_FAST_PG_TIMEOUT, else 30 minutes."""
    text = os.environ.get(PG_TIMEOUT_ENV)
    if text is None:
        return DEFAULT_PG_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{PG_TIMEOUT_ENV}={text!r}: give the process-group timeout in seconds, more than 0")
    return value


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ConfigError(f"SLURM_NODELIST={nodelist!r}: no host in it; set MASTER_ADDR")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def launcher_ranks(environ=None) -> dict | None:
    """The torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of a process an MPI
    launcher or srun started without torchrun; None for a process a torch launcher started (RANK is set) or none.
    MASTER_ADDR: as given, else under Slurm the node list's first host; MASTER_PORT: as given, else 29500."""
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return None
    for name, rank_var, size_var, local_var in LAUNCHERS:
        if rank_var not in env:
            continue
        size = env.get(size_var) or env.get("SLURM_NTASKS" if rank_var == "SLURM_PROCID" else size_var)
        if size is None:
            raise ConfigError(f"started by {name} ({rank_var} is set) without {size_var}: cannot tell the world size")
        addr = env.get("MASTER_ADDR")
        if addr is None and "SLURM_NODELIST" in env and rank_var == "SLURM_PROCID":
            addr = first_slurm_host(env["SLURM_NODELIST"])
        if addr is None and int(size) > 1:
            raise ConfigError(f"started by {name} with {size} processes: set MASTER_ADDR to the first host's address "
                              f"(and MASTER_PORT, default {DEFAULT_MASTER_PORT}), e.g. mpirun -x MASTER_ADDR=host0")
        return {"RANK": env[rank_var], "WORLD_SIZE": size, "LOCAL_RANK": env.get(local_var, "0"),
                "MASTER_ADDR": addr or "127.0.0.1", "MASTER_PORT": env.get("MASTER_PORT", DEFAULT_MASTER_PORT)}
    return None


def launched_world_size(environ=None) -> int:
    """How many ranks the launcher started (1 for a plain process)."""
    env = os.environ if environ is None else environ
    ranks = launcher_ranks(env)
    return int((ranks or env).get("WORLD_SIZE", 1))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s=None):
    """Initialise torch.distributed through DeepSpeed, with collectives that wait at most ``timeout_s`` seconds
    (default: ``default_pg_timeout()``); a process of an MPI launcher or srun gets its rank from their variables,
    a plain ``python script.py`` becomes a world of one.

    Without CUDA, DeepSpeed is told to use its CPU accelerator (DS_ACCELERATOR) before it is first imported, so it
    does not probe for other devices; done here, when a run starts, not as a side effect of an import."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # Not started by a launcher: make the env:// rendezvous of a single process. Variables that an earlier
    # single-process run made (in this process, or inherited by a child) are ours to replace: reusing them would
    # reuse a port that process may still hold. A launcher's own MASTER_PORT differs from the one we recorded.
    ours = os.environ.get(_SELF_RENDEZVOUS) == os.environ.get("MASTER_PORT")
    launched = None if ours else launcher_ranks()
    if launched is not None and not dist.is_initialized():
        os.environ.update(launched)
    elif ("RANK" not in os.environ or ours) and not dist.is_initialized():
        port = str(_free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        os.environ[_SELF_RENDEZVOUS] = port
    if not torch.cuda.is_available():
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op in every process at start-up
        # (minutes on a small machine, and processes wait on one build lock). Only its inference all-reduce uses
        # it; training collectives go through gloo, so skip the build.
        # (import_module: the attribute deepspeed.comm.torch is PyTorch itself, re-exported by a star import)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else default_pg_timeout())
    _every_group_waits(timeout)
    deepspeed.init_distributed(verbose=False, auto_mpi_discovery=False, timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())


def _every_group_waits(timeout):
    """The groups DeepSpeed makes later (ZeRO's data-parallel group: new_group without a timeout) wait ``timeout``
    too, not torch's default of 30 minutes: a rank frozen in ZeRO's gradient reduction would hold the others that
    long. torch reads this default when a group is made."""
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout


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
    """Tear the process group down (NCCL warns at exit otherwise): after a barrier when the run ended well; at
    once while an error ends it (called from a ``finally``), since a rank that froze would never reach the barrier."""
    if dist.is_initialized():
        if sys.exc_info()[1] is None:
            barrier()
        # DeepSpeed's engine lives in reference cycles, with collectives it started ahead (ZeRO-3's prefetched
        # gathers): free them while their group is alive, not at interpreter exit, where gloo's threads abort
        gc.collect()
        torch.distributed.destroy_process_group()


def timed_out(error: BaseException) -> bool:
    """Whether ``error`` is a collective that waited past the process-group timeout (gloo, NCCL)."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("Timed out" in text or "timed out" in text or "Watchdog" in text)


def barrier():
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank: one decision for all."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_all(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def where_ranks(ranks) -> str:
    """"rank 1 on host b; ranks 2, 3 on host c" for a list of (rank, host)."""
    hosts = {}
    for r, host in ranks:
        hosts.setdefault(host, []).append(str(r))
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(rs)} on host {host}" for host, rs in hosts.items())


def check_shared_folder(folder, flag):
    """Every rank sees the file rank 0 has just written in ``folder`` (given as ``flag``): one checkpoint folder for
    all ranks needs a file system every node mounts. Otherwise a ConfigError on every rank naming those that do
    not see it."""
    if world_size() == 1:
        return
    token = broadcast_from_main(secrets.token_hex(8))
    path = os.path.join(folder, f".shared_check_{token}")  # a new name: no cached "no such file"
    if is_main():
        with open(path, "w") as f:
            f.write(token)
    barrier()
    try:
        with open(path) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    seen_by = gather_from_all((socket.gethostname(), seen))
    blind = [(r, host) for r, (host, ok) in enumerate(seen_by) if not ok]
    if is_main():
        os.remove(path)
    if blind:
        raise ConfigError(
            f"{flag} {folder} is not shared by every rank: {where_ranks(blind)} cannot see the file rank 0 "
            f"(host {seen_by[0][0]}) wrote there; put it on a file system every "
            "node mounts (NFS, Lustre, ...), under the same path"
        )


def main_first(build):
    """``build()`` on rank 0 first (it may convert feature files to stores), then on the other ranks, which find
    the work done."""
    if is_main():
        result = build()
    barrier()
    if not is_main():
        result = build()
    return result
