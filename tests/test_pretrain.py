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
from lxmert_fast.errors import NonFiniteLossError
from lxmert_fast.train.objectives import pretraining_losses
from lxmert_fast.train.optimization import BertAdam, build_scheduler, warmup_linear
from lxmert_fast.train.pretrain_run import TASKS, model_with_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "lxmert_fast", "pretrain.py")
BIN = os.path.dirname(sys.executable)
STEPS = 8
RUN_ARGS = ["--max-steps", str(STEPS), "--log-every", "1", "--save-every", "4", "--num-workers", "1"]


# ------------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("tasks", [TASKS, ("mlm", "obj", "feat"), ("matched", "attr", "qa")])
def test_losses_equal_transformers(tasks):
    config = small_config("uneven")
    config.update(model_with_tasks({}, tasks))  # the heads of exactly these tasks, as a pre-training run sets them
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


def _run(cmd, cwd, timeout=1200):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert all("event" in r for r in records)
    return [r for r in records if r["event"] == "train"], [r for r in records if r["event"] != "train"]


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
    assert [e["event"] for e in events] == ["eval", "end"] and events[0]["valid_loss"] > 0
    # the validation accuracies (matching, masked words, the sample's object words with true and rolled images)
    accuracies = {k: v for k, v in events[0].items() if k.endswith("_acc")}
    assert set(accuracies) == {f"valid_{name}_acc" for name in ("matched", "mlm", "object", "object_images_shuffled")}
    assert all(0 <= v <= 1 for v in accuracies.values())
    assert "matching" in log and "object words" in log and "with the images shuffled" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:09d}"
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["engine"]["micro_batch"] == 32 and saved["engine"]["world_size"] == 1
    assert saved["run"]["max_steps"] == STEPS
    assert log.count("run config (pretrain)") == 1


@pytest.mark.slow
def test_final_folder_loads_in_transformers_and_lxmert_fast(uninterrupted, workdir):
    folder = uninterrupted[0] / "final_model"
    saved = load_file(str(folder / "model.safetensors"))
    hf = transformers.LxmertForPreTraining.from_pretrained(str(folder))
    ours = LxmertForPreTraining.from_pretrained(str(folder))
    for name, tensor in hf.state_dict().items():
        if name in saved:
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
        torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=0, atol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))  # the folder is self-contained
    assert len(tokenizer) == ours.config.vocab_size
    assert tokenizer.get_vocab() == _sample_tokenizer(workdir).get_vocab()


def _sample_tokenizer(workdir):
    """The tokenizer the sample data set comes with."""
    return transformers.AutoTokenizer.from_pretrained(str(workdir / "sample_data" / "tokenizer"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_a_checkpoint_of_either_engine_exports_to_a_model_folder(uninterrupted, torch_engine_run, workdir, tmp_path,
                                                                 engine):
    """python -m lxmert_fast.export turns a checkpoint into a model folder: the last one's is the final model."""
    run = (uninterrupted if engine == "deepspeed" else torch_engine_run)[0]
    for step in (4, STEPS):
        out = tmp_path / f"step{step}"
        rc, log = _run([sys.executable, "-m", "lxmert_fast.export", str(run / "checkpoints" / f"step{step:09d}"),
                        str(out)], cwd=tmp_path)
        assert rc == 0, log
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
        assert tokenizer.get_vocab() == _sample_tokenizer(workdir).get_vocab()
        LxmertForPreTraining.from_pretrained(str(out))
    assert _max_weight_difference(run, tmp_path / f"step{STEPS}", "model.safetensors") == 0.0


def _kill_after_step_6_and_resume(cmd, cwd, out):
    """Start ``cmd``, SIGKILL it right after step 6 (its last checkpoint is at 4), resume it; returns the log."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"step": 6,' in metrics.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000000004"
    rc, log = _run(cmd + ["--resume"], cwd=cwd)
    assert rc == 0, log
    assert "resumed from" in log
    steps, _ = _metrics(out)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # the killed run's extra lines are dropped
    return log


def _max_weight_difference(run_a, run_b, b_file="final_model/model.safetensors"):
    a = load_file(str(run_a / "final_model" / "model.safetensors"))
    b = load_file(str(run_b / b_file))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_weights(uninterrupted, workdir):
    out = workdir / "killed"
    _kill_after_step_6_and_resume([sys.executable, SCRIPT, *RUN_ARGS, "--output-dir", str(out)], workdir, out)
    assert _max_weight_difference(uninterrupted[0], out) <= 1e-6


# ------------------------------------------------------------------------------ --engine torch (single device)
@pytest.fixture(scope="module")
def torch_engine_run(workdir):
    out = workdir / "torch_engine"
    rc, log = _run([sys.executable, SCRIPT, *RUN_ARGS, "--engine", "torch", "--output-dir", str(out)], cwd=workdir)
    assert rc == 0, log
    return out, log


@pytest.mark.slow
def test_torch_engine_trains_like_deepspeed(uninterrupted, torch_engine_run):
    out, log = torch_engine_run
    assert "plain PyTorch" in log
    ours = [r["loss"] for r in _metrics(out)[0]]
    deepspeed_losses = [r["loss"] for r in _metrics(uninterrupted[0])[0]]
    assert len(ours) == STEPS and ours[-1] < ours[0] - 2.0
    # the same samples, dropout masks, optimiser, schedule and clipping: only the summation order of DeepSpeed's
    # flat gradient buffers differs (fp32 on a CPU)
    assert ours == pytest.approx(deepspeed_losses, rel=1e-5)
    assert _max_weight_difference(uninterrupted[0], out) <= 1e-5
    assert (out / "checkpoints" / "step000000008" / "state.pt").is_file()


@pytest.mark.slow
def test_torch_engine_sigkill_and_resume_gives_the_same_weights(torch_engine_run, workdir):
    out = workdir / "torch_engine_killed"
    cmd = [sys.executable, SCRIPT, *RUN_ARGS, "--engine", "torch", "--output-dir", str(out)]
    _kill_after_step_6_and_resume(cmd, workdir, out)
    assert _max_weight_difference(torch_engine_run[0], out) == 0.0


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
def test_resuming_with_the_other_engine_says_which_one_wrote_the_checkpoint(uninterrupted, torch_engine_run, workdir,
                                                                             tmp_path):
    import shutil

    for run, engine, message in (
        (uninterrupted[0], "torch", "written by DeepSpeed, resume it with --engine deepspeed"),
        (torch_engine_run[0], "deepspeed", "written by --engine torch: resume it with --engine torch"),
    ):
        out = tmp_path / engine
        shutil.copytree(run, out)
        cmd = [sys.executable, SCRIPT, *RUN_ARGS, "--output-dir", str(out), "--resume", "--engine", engine]
        rc, log = _run(cmd, cwd=workdir)
        assert rc != 0 and message in log, log


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(workdir, engine, monkeypatch):
    """The third training forward returns a NaN loss (injected in-process): the run stops at step 3 before the
    update, names the last good checkpoint, and writes no final model."""
    from lxmert_fast import pretrain
    from lxmert_fast.train import objectives

    original, calls = objectives.PretrainingObjective.forward, []

    def forward(self, batch, static=False):
        losses = original(self, batch, static)
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses

    monkeypatch.setattr(objectives.PretrainingObjective, "forward", forward)
    monkeypatch.chdir(workdir)
    out = workdir / f"nan_{engine}"
    argv = ["--max-steps", "6", "--save-every", "2", "--log-every", "1", "--num-workers", "0", "--output-dir",
            str(out), "--engine", engine]
    with pytest.raises(NonFiniteLossError) as error:
        pretrain.main(argv)
    message = str(error.value)
    assert "non-finite loss at step 3" in message and "weights were not updated" in message
    assert "step000000002" in message
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000000002"
    assert not (out / "final_model").exists()


@pytest.mark.slow
def test_plot_metrics(uninterrupted, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    png = tmp_path / "m.png"
    rc, log = _run(
        [sys.executable, "-m", "lxmert_fast.plot_metrics", str(uninterrupted[0] / "metrics.jsonl"), str(png)],
        cwd=tmp_path,
    )
    assert rc == 0 and png.stat().st_size > 0, log
    assert f"(steps 1-{STEPS}: {STEPS} logged steps, 1 evaluation)" in log  # the validation loss beside the loss


def test_plot_metrics_legends_cover_no_curve():
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from lxmert_fast.plot_metrics import figure

    records = [{"event": "train", "step": s, "loss": 10 / s, "mlm_loss": 5 / s, "qa_loss": 3 / s, "lr": 1e-4,
                "samples_per_s": 100 + s} for s in range(1, 40)]
    fig = figure(records, evaluations=[{"event": "eval", "step": 20, "eval_score": 0.5}])
    fig.canvas.draw()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3  # one per panel, twins' curves included
    assert sorted(t.get_text() for t in legends[0].get_texts()) == ["eval_score", "training"]
    for legend in legends:
        box = legend.get_window_extent()
        assert all(box.y1 <= ax.get_window_extent().y0 for ax in fig.axes)  # under every plotting area


def test_plot_metrics_without_matplotlib_says_how_to_install_it(tmp_path):
    """The same command where matplotlib is not installed (hidden here, whatever this machine has)."""
    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 1.0}\n')
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv[0] = 'plot_metrics'; "
            "runpy.run_module('lxmert_fast.plot_metrics', run_name='__main__')")
    rc, log = _run([sys.executable, "-c", hide, "metrics.jsonl", "m.png"], cwd=tmp_path)
    assert rc != 0 and "pip install matplotlib" in log, log
    assert not (tmp_path / "m.png").exists()


# ------------------------------------------------------------------------------------------ checkpoint safety
def test_resume_never_executes_code_from_a_checkpoint(tmp_path):
    """DeepSpeed itself loads with weights_only=False; our engine's loader allows tensors, plain containers and
    DeepSpeed's own few classes, and refuses anything else before it runs."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from lxmert_fast.train import engines, seeding

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=None))
    engines.install_safe_load(engine)
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "loss_scaler": LossScaler(4.0), "rng": seeding.rng_state()}, good)
    state = engine.checkpoint_engine.load(str(good))
    seeding.set_rng_state(state["rng"])
    assert state["loss_scaler"].cur_scale == 4.0
    bad = tmp_path / "bad.pt"
    torch.save({"module": {"w": torch.ones(2)}, "client": Exploit()}, bad)
    with pytest.raises(RuntimeError, match="bad.pt: not a loadable checkpoint"):
        engine.checkpoint_engine.load(str(bad))
    assert not marker.exists()


def _single_device_engine(tmp_seed=0, accumulation=1, clip=1.0):
    from lxmert_fast.train.objectives import PretrainingObjective
    from lxmert_fast.train.single_device import SingleDeviceEngine

    torch.manual_seed(tmp_seed)
    objective = PretrainingObjective(LxmertForPreTraining(small_config("tiny"), backend="torch"))
    optimizer = BertAdam(objective.parameters(), lr=1e-3)
    scheduler = build_scheduler(optimizer, total_steps=10)
    engine = SingleDeviceEngine(objective, optimizer, scheduler, device="cpu", precision="fp32",
                                gradient_clipping=clip, accumulation=accumulation)
    return engine, objective, optimizer, scheduler


def test_graph_counters_only_for_a_graphed_torch_engine():
    """metrics.jsonl gets eager_steps (batches run outside the CUDA graph) only when there is a graph: on a CPU,
    nothing."""
    engine, *_ = _single_device_engine()
    assert engine.graphed is None and engine.counters() == {} and not engine.needs_static_shapes
    engine.graphed, engine.eager_steps = object(), 2  # what a GPU run with two batches that did not fit holds
    assert engine.counters() == {"eager_steps": 2}


def test_torch_engine_checkpoint_never_executes_code_and_names_a_bad_file(tmp_path):
    engine, objective, *_ = _single_device_engine()
    engine.save(str(tmp_path), "good", client_state={"step": 3, "rng": training_rng_state()})
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    client = engine.load(str(tmp_path), "good")
    assert client["step"] == 3
    assert all(torch.equal(before[k], v) for k, v in objective.state_dict().items())

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil").mkdir()
    torch.save({"module": objective.state_dict(), "client_state": Exploit()}, tmp_path / "evil" / "state.pt")
    with pytest.raises(RuntimeError, match=r"evil/state.pt: not a checkpoint of --engine torch"):
        engine.load(str(tmp_path), "evil")
    assert not marker.exists()
    (tmp_path / "cut").mkdir()
    data = (tmp_path / "good" / "state.pt").read_bytes()
    (tmp_path / "cut" / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=r"cut/state.pt"):
        engine.load(str(tmp_path), "cut")


def training_rng_state():
    from lxmert_fast.train import seeding

    return seeding.rng_state()


def test_torch_engine_accumulates_clips_and_steps_at_the_boundary():
    config = small_config("tiny")
    halves = [make_batch(config, batch=2, seed=s) for s in (5, 6)]
    engine, objective, optimizer, _ = _single_device_engine(accumulation=2, clip=0.5)
    reference, ref_objective, ref_optimizer, ref_scheduler = _single_device_engine(accumulation=1, clip=0.0)
    for i, half in enumerate(halves):
        torch.manual_seed(100 + i)
        engine.forward_backward(half)
        engine.step()
        if i == 0:  # no update before the boundary
            assert all(torch.equal(p, q) for p, q in zip(objective.parameters(), ref_objective.parameters(),
                                                         strict=True))
    # by hand: mean of the two micro-batch losses, clipped to norm 0.5, one BertAdam step
    for i, half in enumerate(halves):
        torch.manual_seed(100 + i)
        (ref_objective(half)["loss"] / 2).backward()
    torch.nn.utils.clip_grad_norm_(ref_objective.parameters(), 0.5)
    ref_optimizer.step()
    ref_scheduler.step()
    for p, q in zip(objective.parameters(), ref_objective.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert all(p.grad is None for p in objective.parameters())  # eager: the gradients are reset after the update
    assert engine.scheduler.last_epoch == 1


@pytest.mark.parametrize("chunk", [0, 40, 1 << 40], ids=["one-per-chunk", "several-per-chunk", "one-chunk"])
def test_bertadam_multi_tensor_step_equals_the_per_parameter_formulas(monkeypatch, chunk):
    """BertAdam updates chunks of parameters with one multi-tensor operation per formula (on a GPU; one parameter
    per chunk on a CPU); whatever the chunking, that is bit for bit the per-parameter arithmetic of its docstring,
    with parameters of several shapes and one without a gradient."""
    import lxmert_fast.train.optimization as optimization

    monkeypatch.setattr(optimization, "chunk_elements", lambda device: chunk)
    assert [len(c) for c in optimization._chunks([torch.zeros(35), torch.zeros(5), torch.zeros(8)], 40)] == [2, 1]
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    expected = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in expected]
    v = [torch.zeros_like(p) for p in expected]
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 0.01
    opt = BertAdam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for step in range(4):
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and step == 0) else torch.randn(p.shape)
            if p.grad is None:
                continue
            g = p.grad
            m[i].mul_(b1).add_(g, alpha=1 - b1)
            v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            update = m[i] / (v[i].sqrt() + eps)
            update.add_(expected[i], alpha=wd)
            expected[i].add_(update, alpha=-lr)
        opt.step()
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p.detach(), e)
    assert opt.state[params[1]]["step"] == 3 and opt.state[params[0]]["step"] == 4


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.startswith("ds_")))
def test_every_deepspeed_config_resolves_to_a_batch_geometry(name):
    from lxmert_fast.train import run_config

    flags = {"engine": "deepspeed", "seed": 1}
    config = run_config.resolve("pretrain", flags, default_deepspeed=name, world_size=1)
    engine = config.engine
    cfg = engine.deepspeed
    assert engine.micro_batch >= 1 and engine.accumulation >= 1 and engine.precision in ("fp16", "bf16", "fp32")
    assert cfg["train_batch_size"] == engine.micro_batch * engine.accumulation
    assert "optimizer" not in cfg and "scheduler" not in cfg and cfg["zero_allow_untested_optimizer"]
    if name.startswith("ds_paper"):  # the paper's global batch on one rank
        assert engine.global_batch == 256
    if name == "ds_paper_1gpu_bf16.json":  # --engine torch graphs only steps without accumulation
        assert engine.accumulation == 1 and cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"]
