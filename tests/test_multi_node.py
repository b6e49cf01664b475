"""Runs beyond one process: every launcher's variables, the process-group timeout, ranks that agree on what they
resume from, an output folder every node must see, losses that do not depend on the rank count, export of any
ZeRO stage.

Several "nodes" are simulated on this machine: processes started with the variables mpirun, srun or torchrun would
give them, each in its own working directory where a node would have its own disk. CPU and gloo; a few steps each.
"""

import os
import shutil
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
distributed.shutdown()  # both ranks leave together: gloo aborts a process that exits while its peer still talks
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


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun here (Debian: apt-get install openmpi-bin)")
def test_mpirun_starts_two_ranks_of_a_short_run(tmp_path):
    """Open MPI's own launcher: its OMPI_COMM_WORLD_* variables become the ranks of one run."""
    from lxmert_fast.data import ensure_sample_data

    ensure_sample_data(tmp_path / "sample_data")
    out = tmp_path / "out"
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = ["mpirun", "--oversubscribe", "-np", "2", "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "PYTHONPATH",
           "-x", "TOKENIZERS_PARALLELISM", sys.executable, "-m", "lxmert_fast.pretrain", "--sample-data-dir",
           str(tmp_path / "sample_data"), *RUN_ARGS, "--micro-batch-size", "2", "--max-steps", "2", "--output-dir",
           str(out)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 rank(s) = 4" in proc.stdout and len(train_losses(out)) == 2, proc.stdout[-3000:]


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


# ------------------------------------------------------------------------------- two nodes simulated on one machine
RUN_ARGS = ["--valid-batches", "0", "--num-workers", "0", "--log-every", "1", "--save-every", "2"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A "shared file system": the sample data, and the folder the runs write to."""
    from lxmert_fast.data import ensure_sample_data

    folder = tmp_path_factory.mktemp("shared")
    ensure_sample_data(folder / "sample_data")
    return folder


def two_nodes(shared, tmp_path, *args, timeout=600):
    """torchrun on two "nodes" (one rank each), each in its own working directory; returns (codes, outputs)."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, "-m",
               "lxmert_fast.pretrain", "--sample-data-dir", str(shared / "sample_data"), *RUN_ARGS, *args]
        procs += start_ranks(cmd, [clean_env()], cwd=cwd)
    return finish(procs, timeout)


def train_losses(out):
    import json

    with open(out / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if r["event"] == "train"]


@pytest.fixture(scope="module")
def zero3_two_nodes(shared, tmp_path_factory):
    out = shared / "zero3"
    codes, logs = two_nodes(shared, tmp_path_factory.mktemp("nodes"), "--deepspeed_config", "ds_zero3_fp16.json",
                            "--max-steps", "4", "--output-dir", str(out))
    assert codes == [0, 0], logs
    return out


@pytest.mark.slow
def test_two_nodes_with_a_shared_folder_resume_from_the_checkpoint_rank_0_chose(zero3_two_nodes, shared, tmp_path):
    import shutil

    from safetensors.torch import load_file

    out = shared / "zero3_resumed"
    shutil.copytree(zero3_two_nodes, out)
    shutil.rmtree(out / "final_model")
    (out / "checkpoints" / "latest").write_text("step000000002")  # as if killed after step 2's checkpoint
    codes, logs = two_nodes(shared, tmp_path, "--deepspeed_config", "ds_zero3_fp16.json", "--max-steps", "4",
                            "--output-dir", str(out), "--resume")
    assert codes == [0, 0], logs
    assert "resumed from" in logs[0] and "step 2" in logs[0]
    assert train_losses(out) == train_losses(zero3_two_nodes)
    a, b = (load_file(str(folder / "final_model" / "model.safetensors")) for folder in (out, zero3_two_nodes))
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


@pytest.mark.slow
def test_a_zero3_checkpoint_of_two_ranks_exports_to_the_final_model(zero3_two_nodes, tmp_path):
    from safetensors.torch import load_file

    export = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "lxmert_fast.export", str(zero3_two_nodes / "checkpoints" /
                          "step000000004"), str(export)], env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = (load_file(str(folder / "model.safetensors")) for folder in (export, zero3_two_nodes / "final_model"))
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_an_output_dir_that_not_every_node_sees_is_refused_at_start_naming_the_rank(shared, tmp_path):
    """Each node's relative --output-dir is a folder of its own working directory: refused before training."""
    codes, logs = two_nodes(shared, tmp_path, "--max-steps", "2", "--output-dir", "out", timeout=300)
    assert codes[0] != 0 and codes[1] != 0, logs
    message = "--output-dir out is not shared by every rank: rank 1 on host"
    assert all(message in log for log in logs), logs
    assert not (tmp_path / "node0" / "out" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------ loss normalisation
def grouped_loss_and_gradients(world, groups=4, accumulation=1, batch_size=8):
    """The loss and gradients DeepSpeed would form from ``world`` ranks (rows split as sampling.epoch_batches
    splits them), the ranks simulated in this process: the mean over ranks and accumulation steps."""
    import torch
    from helpers import make_batch, small_config

    from lxmert_fast import LxmertForPreTraining
    from lxmert_fast.train.objectives import LossGroups, pretraining_losses

    config = small_config("tiny")
    torch.manual_seed(0)
    model = LxmertForPreTraining(config, backend="torch")
    full = make_batch(config, batch=batch_size, seed=3)
    full["ans"] = torch.tensor([1, -100, 2, 2, -100, -100, 3, 1][:batch_size])
    full["labels"][5:, :] = -100  # groups with different numbers of masked words, one without
    micro = batch_size // (world * accumulation)
    parts = {}
    for step in range(accumulation):
        chunk = {k: tree_rows(v, slice(step * micro * world, (step + 1) * micro * world)) for k, v in full.items()}
        for r in range(world):
            parts[step, r] = {k: tree_rows(v, slice(r, None, world)) for k, v in chunk.items()}
    makers = {key: LossGroups(groups, micro, accumulation, world, key[1]) for key in parts}
    total = 0.0
    for step in range(accumulation):
        summed = sum(makers[step, r].local_counts(parts[step, r]) for r in range(world))
        for r in range(world):
            makers[step, r].reduce = lambda counts, summed=summed: summed.clone()
            weights = makers[step, r].weights(parts[step, r])
            loss = pretraining_losses(model, parts[step, r], label_weights=weights)["loss"] / (world * accumulation)
            loss.backward()
            total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def tree_rows(value, rows):
    if isinstance(value, dict):
        return {k: tree_rows(v, rows) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(tree_rows(v, rows) for v in value)
    return value[rows]


def test_losses_and_gradients_do_not_depend_on_the_rank_count_or_accumulation():
    import torch

    loss_one, grads_one = grouped_loss_and_gradients(world=1)
    for world, accumulation in ((2, 1), (4, 1), (2, 2), (1, 4)):
        loss, grads = grouped_loss_and_gradients(world, accumulation=accumulation)
        assert abs(loss - loss_one) <= 1e-6 * abs(loss_one), (world, accumulation, loss, loss_one)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_grouped_loss_is_the_mean_over_groups_of_each_groups_mean():
    """One rank, 4 groups of 2: the QA loss is the mean of the 4 groups' mean cross-entropies (a group without a
    labelled question counts 0, as the original's replica did)."""
    import torch
    import torch.nn.functional as F
    from helpers import make_batch, small_config

    from lxmert_fast import LxmertForPreTraining
    from lxmert_fast.train.objectives import LossGroups, pretraining_losses

    config = small_config("tiny")
    model = LxmertForPreTraining(config, backend="torch").eval()
    batch = make_batch(config, batch=8, seed=3)
    batch["ans"] = torch.tensor([1, -100, 2, 2, -100, -100, 3, 1])
    with torch.no_grad():
        ours = pretraining_losses(model, batch, label_weights=LossGroups(4, 8, 1, 1, 0).weights(batch))["qa_loss"]
        logits = model(**{k: batch[k] for k in ("input_ids", "visual_feats", "visual_pos", "attention_mask",
                                                "visual_attention_mask", "token_type_ids")}).question_answering_score
    expected = []
    for g in range(4):
        ans = batch["ans"][2 * g:2 * g + 2]
        mine = ans != -100
        expected.append(F.cross_entropy(logits[2 * g:2 * g + 2][mine], ans[mine]) if mine.any() else torch.zeros(()))
    torch.testing.assert_close(ours, torch.stack(expected).mean(), rtol=1e-6, atol=1e-6)


def test_loss_groups_that_do_not_split_the_batch_are_refused_naming_the_numbers():
    from lxmert_fast.train.objectives import check_loss_groups

    check_loss_groups(4, 32, 1, 2)
    check_loss_groups(0, 3, 1, 1)  # each rank's own mean: any batch
    with pytest.raises(ConfigError, match=r"--loss-groups 4: the global batch of 3 x 1 accumulation step\(s\) x 1"):
        check_loss_groups(4, 3, 1, 1)
    with pytest.raises(ConfigError, match="give a multiple of 8"):
        check_loss_groups(4, 32, 8, 1)
