"""Pre-training: losses against transformers, the optimiser and schedule, and whole runs of lxmert_fast/pretrain.py.

The whole runs are subprocesses on the generated sample data with the small preset (CPU: fp32 fallback): one
uninterrupted run (loss falls, metrics, HF folder), the same run killed with SIGKILL and resumed (same weights),
the same global batch on 2 ranks under ZeRO-2 through the deepspeed launcher, and a NaN that stops the run.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import transformers
from helpers import make_batch, small_config
from safetensors.torch import load_file

from lxmert_fast import LxmertForPreTraining
from lxmert_fast.optimization import BertAdam, build_scheduler, warmup_linear
from lxmert_fast.pretrain import TASKS, apply_task_switches, pretraining_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "lxmert_fast", "pretrain.py")
BIN = os.path.dirname(sys.executable)
STEPS = 8
RUN_ARGS = ["--max-steps", str(STEPS), "--log-every", "1", "--save-every", "4", "--num-workers", "1"]


# ------------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("tasks", [TASKS, ("mlm", "obj", "feat"), ("matched", "attr", "qa")])
def test_losses_equal_transformers(tasks):
    config = apply_task_switches(small_config("uneven"), tasks)
    torch.manual_seed(0)
    ours = LxmertForPreTraining(config, backend="torch").eval()
    reference = transformers.LxmertForPreTraining(config).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    batch = make_batch(config, batch=4, text_len=9, objects=5, seed=1)
    with torch.no_grad():
        losses = pretraining_losses(ours, batch)
        expected = reference(**batch).loss
    assert set(losses) == {"loss"} | {f"{t}_loss" for t in tasks}
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))


def test_missing_labels_give_zero_not_nan():
    config = small_config("tiny")
    model = LxmertForPreTraining(config, backend="torch")
    batch = make_batch(config, batch=2, seed=2)
    batch["ans"][:] = -100
    batch["labels"][:] = -100
    losses = pretraining_losses(model, batch)
    assert losses["qa_loss"].item() == 0.0 and losses["mlm_loss"].item() == 0.0
    losses["loss"].backward()  # every parameter still gets a gradient, so ZeRO's buckets stay uniform
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------ optimiser, schedule
def test_bertadam_matches_hand_computation():
    torch.manual_seed(0)
    p0 = torch.randn(5)
    grads = [torch.randn(5) for _ in range(3)]
    p = torch.nn.Parameter(p0.clone())
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-6, 0.01
    opt = BertAdam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    expected, m, v = p0.double().clone(), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        expected = expected - lr * (m / (v.sqrt() + eps) + wd * expected)  # no bias correction, decay on all
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-6)
    # the first step has no bias correction: |update| = lr * (1 - b1) / sqrt(1 - b2) per element, not lr
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = torch.tensor([1.0, -2.0, 3.0])
    BertAdam([q], lr=1.0, weight_decay=0.0).step()
    torch.testing.assert_close(q.detach().abs(), torch.full((3,), 0.1 / math.sqrt(0.001)), rtol=1e-4, atol=0)


def test_warmup_then_linear_decay():
    total = 200  # 5% warm-up: 10 steps
    values = [warmup_linear(s, total) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[4] == pytest.approx(0.5)
    assert values[9] == pytest.approx(1.0)  # the peak at the end of warm-up
    assert values[109] == pytest.approx((1 - 110 / 200) / 0.95)
    assert values[-1] == 0.0
    assert all(a < b for a, b in zip(values[:9], values[1:10], strict=True))
    assert all(a > b for a, b in zip(values[9:-1], values[10:], strict=True))
    opt = BertAdam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = build_scheduler(opt, total)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-4 * v for v in values[:12]])


# -------------------------------------------------------------------------------------------------- whole runs
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd, cwd, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "event" not in r], [r for r in records if "event" in r]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory whose ./sample_data is generated once (the default location of the no-argument run)."""
    from lxmert_fast.data import ensure_sample_data

    work = tmp_path_factory.mktemp("pretrain")
    ensure_sample_data(work / "sample_data")
    return work


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """The no-argument run, only shorter: default data, model preset, DeepSpeed config and output dir."""
    rc, log = _run([sys.executable, SCRIPT, *RUN_ARGS], cwd=workdir)
    assert rc == 0, log
    return workdir / "output" / "pretrain", log


@pytest.mark.slow
def test_default_run_trains_and_writes_outputs(uninterrupted):
    out, log = uninterrupted
    assert "training in fp32 instead" in log or torch.cuda.is_available()
    steps, events = _metrics(out)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert {"step", "epoch", "lr", "loss", "samples_per_s"} <= set(r)
        assert {f"{t}_loss" for t in TASKS} <= set(r)
    losses = [r["loss"] for r in steps]
    assert sum(losses[-2:]) < sum(losses[:2]) - 2.0, losses  # falls clearly within 8 steps
    assert events and events[-1]["event"] == "end" and events[-1]["total_time_s"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:09d}"


@pytest.mark.slow
def test_final_folder_loads_in_transformers_and_lxmert_fast(uninterrupted):
    folder = uninterrupted[0] / "final_model"
    saved = load_file(str(folder / "model.safetensors"))
    hf = transformers.LxmertForPreTraining.from_pretrained(str(folder))
    ours = LxmertForPreTraining.from_pretrained(str(folder))
    for name, tensor in hf.state_dict().items():
        if name in saved:
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
        torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_weights(uninterrupted, workdir):
    out = workdir / "killed"
    cmd = [sys.executable, SCRIPT, *RUN_ARGS, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill right after step 6 (a checkpoint was at 4)
        if metrics.is_file() and '"step": 6,' in metrics.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000000004"
    rc, log = _run(cmd + ["--resume"], cwd=workdir)
    assert rc == 0, log
    assert "resumed from" in log
    a = load_file(str(uninterrupted[0] / "final_model" / "model.safetensors"))
    b = load_file(str(out / "final_model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps, _ = _metrics(out)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # the killed run's extra lines are dropped


@pytest.mark.slow
def test_two_cpu_ranks_zero2_follow_one_rank(uninterrupted, workdir, tmp_path):
    with open(os.path.join(REPO, "configs", "ds_zero2_fp16.json")) as f:
        ds = json.load(f)
    one_rank_batch = ds.pop("train_micro_batch_size_per_gpu") * ds["gradient_accumulation_steps"]
    ds["train_batch_size"] = one_rank_batch  # the same global batch, split over the ranks
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    out = workdir / "two_ranks"
    cmd = [
        os.path.join(BIN, "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        SCRIPT,
        *RUN_ARGS,
        "--output-dir",
        str(out),
        "--deepspeed_config",
        str(ds_path),
    ]
    rc, log = _run(cmd, cwd=workdir)
    assert rc == 0, log
    assert "2 rank(s)" in log and "ZeRO-2" in log
    one = [r["loss"] for r in _metrics(uninterrupted[0])[0]]
    two = [r["loss"] for r in _metrics(out)[0]]
    assert len(two) == len(one) == STEPS
    # same samples in every global batch; only dropout draws and the per-rank averaging of MLM tokens differ
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 0.03 * a, (one, two)


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(workdir):
    out = workdir / "nan"
    cmd = [
        sys.executable,
        SCRIPT,
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--num-workers",
        "0",
        "--output-dir",
        str(out),
        "--inject-nan-at-step",
        "3",
    ]
    rc, log = _run(cmd, cwd=workdir)
    assert rc != 0
    assert "non-finite loss at step 3" in log, log
    assert "step000000002" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000000002"
    assert not (out / "final_model").exists()


@pytest.mark.slow
def test_plot_metrics(uninterrupted, tmp_path):
    png = tmp_path / "m.png"
    rc, log = _run(
        [sys.executable, "-m", "lxmert_fast.plot_metrics", str(uninterrupted[0] / "metrics.jsonl"), str(png)],
        cwd=tmp_path,
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc != 0 and "pip install matplotlib" in log
    else:
        assert rc == 0 and png.stat().st_size > 0, log


# ------------------------------------------------------------------------------------------ checkpoint safety
def test_resume_never_executes_code_from_a_checkpoint(tmp_path):
    """DeepSpeed itself loads with weights_only=False; our engine's loader allows tensors, plain containers and
    DeepSpeed's own few classes, and refuses anything else before it runs."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from lxmert_fast import training

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=None))
    training._load_without_code(engine)
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "loss_scaler": LossScaler(4.0), "rng": training.rng_state()}, good)
    state = engine.checkpoint_engine.load(str(good))
    training.set_rng_state(state["rng"])
    assert state["loss_scaler"].cur_scale == 4.0
    bad = tmp_path / "bad.pt"
    torch.save({"module": {"w": torch.ones(2)}, "client": Exploit()}, bad)
    with pytest.raises(RuntimeError, match="bad.pt: not a loadable checkpoint"):
        engine.checkpoint_engine.load(str(bad))
    assert not marker.exists()
