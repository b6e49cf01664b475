"""Runs beyond one process: every launcher's variables, the process-group timeout, ranks that agree on what they
resume from, an output folder every node must see, losses that do not depend on the rank count, export of any
ZeRO stage.

Several "nodes" are simulated on this machine: processes started with the variables mpirun, srun or torchrun would
give them, each in its own working directory where a node would have its own disk. CPU and gloo; a few steps each.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from lxmert_fast.errors import ConfigError
from lxmert_fast.train.distributed import first_slurm_host, launched_world_size, launcher_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# init_distributed in each process, one all-reduce of rank + 1; rank 1 sleeps first when FREEZE is set
PROBE = """
import os, time, torch
from lxmert_fast.train import distributed
distributed.init_distributed()
if os.environ.get("FREEZE") and distributed.rank() == 1:
    time.sleep(120)
t = torch.tensor([float(distributed.rank() + 1)])
torch.distributed.all_reduce(t)
print(f"rank {distributed.rank()} of {distributed.world_size()}, local {os.environ['LOCAL_RANK']}: {t.item():g}")
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra):
    """This environment without any launcher's variables, plus ``extra``."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_", "PMI_", "SLURM_",
                "LXMERT_FAST_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def start_ranks(code_or_cmd, rank_envs, cwd=None):
    """One process per environment in ``rank_envs``: ``python -c code`` (a string) or the command (a list)."""
    cmd = [sys.executable, "-c", code_or_cmd] if isinstance(code_or_cmd, str) else code_or_cmd
    return [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for env in rank_envs]


def finish(procs, timeout):
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return [p.returncode for p in procs], outputs


# ------------------------------------------------------------------------------------------------- launchers
def test_mpi_and_slurm_variables_become_torch_ranks():
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "MASTER_ADDR": "host0"}
    assert launcher_ranks(ompi) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "host0",
                                    "MASTER_PORT": "29500"}
    pmi = {"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert launcher_ranks(pmi)["RANK"] == "1" and launcher_ranks(pmi)["MASTER_PORT"] == "1234"
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[003-005],cpu1"}
    assert launcher_ranks(slurm) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                                     "MASTER_PORT": "29500"}
    assert launched_world_size(slurm) == 8 and launched_world_size({}) == 1
    assert launcher_ranks({**slurm, "RANK": "0"}) is None  # torchrun inside srun: torchrun's ranks win
    assert [first_slurm_host(x) for x in ("n1", "n[1,3]", "a-b[07-09]", "x,y")] == ["n1", "n1", "a-b07", "x"]
    with pytest.raises(ConfigError, match=r"mpirun \(Open MPI\) with 4 processes: set MASTER_ADDR"):
        launcher_ranks({k: v for k, v in ompi.items() if k != "MASTER_ADDR"})


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_two_processes_with_an_mpi_or_slurm_environment_form_one_world(launcher):
    port = str(free_port())
    if launcher == "mpirun":
        envs = [clean_env(OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(r),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in (0, 1)]
    else:
        envs = [clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NODELIST="localhost",
                          MASTER_PORT=port) for r in (0, 1)]
    codes, outputs = finish(start_ranks(PROBE, envs), timeout=300)
    assert codes == [0, 0], outputs
    assert "rank 0 of 2, local 0: 3" in outputs[0] and "rank 1 of 2, local 1: 3" in outputs[1], outputs


def test_a_frozen_rank_ends_the_others_within_the_process_group_timeout():
    port = str(free_port())
    envs = [clean_env(OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, FREEZE="1", LXMERT_FAST_PG_TIMEOUT="3") for r in (0, 1)]
    procs = start_ranks(PROBE, envs)
    try:
        t0 = time.time()
        out = procs[0].communicate(timeout=200)[0]
        assert procs[0].returncode != 0 and "Timed out waiting 3000ms" in out, out
        assert time.time() - t0 < 120  # start-up (DeepSpeed's import) plus 3 s, not the 120 s rank 1 sleeps
    finally:
        procs[1].kill()
        procs[1].wait()
