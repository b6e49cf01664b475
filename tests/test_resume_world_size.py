"""A run resumed on another number of ranks goes on from the same sample with the same global batch and its
optimiser state resharded (lxmert_fast.train.reshard); a frozen rank ends a whole run within the process-group
timeout. CPU and gloo, a tiny model without dropout, a few steps."""

import json
import os
import shutil
import signal
import sys
import time

import pytest
import torch
from test_multi_node import clean_env, finish, free_port, start_ranks, train_losses

from lxmert_fast.errors import ConfigError
from lxmert_fast.train.loop import Position, regrouped
from lxmert_fast.train.run_config import EngineSettings, keep_global_batch, resolve

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The sample data and a tiny model config without dropout (the masks are per sample; dropout is per rank)."""
    from lxmert_fast.data import ensure_sample_data
    from lxmert_fast.resources import find_config

    folder = tmp_path_factory.mktemp("world_size")
    ensure_sample_data(folder / "sample_data")
    with open(find_config("lxmert_small")) as f:
        model = json.load(f)
    model.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, l_layers=1, x_layers=1, r_layers=1,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "tiny.json").write_text(json.dumps(model))
    return folder


def pretrain(setup, ranks, out, *args, timeout=300):
    """A 4-step run (checkpoints at steps 2 and 4) on ``ranks`` processes; returns its output."""
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), "-m", "lxmert_fast.pretrain",
           "--sample-data-dir", str(setup / "sample_data"), "--model-config", str(setup / "tiny.json"),
           "--valid-batches", "0", "--num-workers", "0", "--log-every", "1", "--save-every", "2", "--max-steps", "4",
           "--micro-batch-size", "2", "--lr", "5e-3", "--output-dir", str(out), *args]
    codes, outputs = finish(start_ranks(cmd, [clean_env()]), timeout)
    assert codes == [0], outputs[0][-3000:]
    return outputs[0]


def resumed_from_step_2(setup, source, out, ranks, *args):
    """``source``'s folder as if killed after its step-2 checkpoint, resumed on ``ranks`` ranks."""
    shutil.copytree(source, out)
    shutil.rmtree(out / "final_model")
    (out / "checkpoints" / "latest").write_text("step000000002")
    return pretrain(setup, ranks, out, "--resume", *args)


def largest_difference(a, b):
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final_model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_a_run_resumed_on_another_rank_count_goes_on_as_the_uninterrupted_run(setup, tmp_path, zero):
    """2 ranks -> 1 (accumulation 1 -> 2, chosen by the resume) and 1 -> 2 (accumulation 2 -> 1): the losses after
    the resume within 1e-3 of the uninterrupted runs', the final weights within 1e-5."""
    ds = f"ds_zero{zero}_fp16.json"
    two, one = tmp_path / "two", tmp_path / "one"
    pretrain(setup, 2, two, "--deepspeed_config", ds)
    pretrain(setup, 1, one, "--deepspeed_config", ds, "--gradient-accumulation", "2")
    reference = train_losses(two)
    assert len(reference) == 4 and largest_difference(train_losses(one), reference) < 1e-3
    log = resumed_from_step_2(setup, two, tmp_path / "two_to_one", 1, "--deepspeed_config", ds)
    assert "gradient_accumulation_steps 1 -> 2: the global batch 4 of the resumed run, on 1 rank(s)" in log
    log = resumed_from_step_2(setup, one, tmp_path / "one_to_two", 2, "--deepspeed_config", ds)
    assert "resumed from" in log and "step 2" in log
    for out in (tmp_path / "two_to_one", tmp_path / "one_to_two"):
        losses = train_losses(out)
        assert len(losses) == 4 and largest_difference(losses[2:], reference[2:]) < 1e-3, (out, losses)
        ours, theirs = final_weights(out), final_weights(two)
        assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-5) for k in theirs), out
    saved = json.loads((tmp_path / "two_to_one" / "run_config.json").read_text())
    assert (saved["engine"]["world_size"], saved["engine"]["accumulation"]) == (1, 2)
    earlier = saved["earlier_runs"]
    assert [(e["engine"]["world_size"], e["engine"]["accumulation"], e["resumed_at_step"]) for e in earlier] == [
        (2, 1, 2)]


def test_the_global_batch_is_kept_by_the_accumulation_or_refused_naming_the_numbers(tmp_path):
    assert keep_global_batch(8, 2, 2) == (2, 2) and keep_global_batch(8, 4, 1) == (4, 2)
    assert keep_global_batch(12, 4, 2) == (3, 2)  # the micro-batch does not divide 6: the largest below it that does
    assert keep_global_batch(4, 2, 3) is None
    flags = {"engine": "deepspeed", "seed": 1, "deepspeed_config": str(tmp_path / "ds.json"),
             "output_dir": str(tmp_path / "out")}
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    two = resolve("pretrain", flags, default_deepspeed="x", model={"hidden_size": 32}, world_size=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_config.json").write_text(two.to_json())
    one = resolve("pretrain", {**flags, "resume": True}, default_deepspeed="x", model={"hidden_size": 32},
                  world_size=1)
    assert (one.engine.micro_batch, one.engine.accumulation, one.engine.deepspeed["train_batch_size"]) == (2, 2, 4)
    one.check_resume(json.loads(two.to_json()), "out/run_config.json")
    three = resolve("pretrain", {**flags, "resume": True}, default_deepspeed="x", model={"hidden_size": 32},
                    world_size=3)
    with pytest.raises(ConfigError, match=r"global batch is 6 \(micro-batch 2 x accumulation 1 x 3 rank\(s\)\), the "
                       r"run in out/run_config.json had 4 \(micro-batch 2 x accumulation 1 x 2 rank\(s\)\): 4 "
                       r"samples do not split over 3 ranks; resume on 1, 2, 4 ranks"):
        three.check_resume(json.loads(two.to_json()), "out/run_config.json")
    given = resolve("pretrain", {**flags, "resume": True, "gradient_accumulation": 1}, default_deepspeed="x",
                    model={"hidden_size": 32}, world_size=1)  # the numbers given win, and are refused
    with pytest.raises(ConfigError, match="keep it with --micro-batch-size 2 --gradient-accumulation 2"):
        given.check_resume(json.loads(two.to_json()), "out/run_config.json")


def test_a_checkpoints_position_is_regrouped_into_the_new_micro_batches():
    saved = {"micro_batch": 2, "accumulation": 1, "world_size": 2}
    one_rank = EngineSettings(micro_batch=2, accumulation=2, world_size=1)
    assert regrouped(Position(step=3, epoch=1, pos=3, micro_step=10), saved, one_rank) == Position(3, 1, 6, 20)
    four = EngineSettings(micro_batch=1, accumulation=1, world_size=4)
    assert regrouped(Position(step=1, epoch=0, pos=1, micro_step=1), saved, four) == Position(1, 0, 1, 1)
    assert regrouped(Position(2, 0, 2, 2), None, one_rank) == Position(2, 0, 2, 2)  # an older checkpoint
    with pytest.raises(ConfigError, match="not a whole number of this run's micro-batches of 8"):
        regrouped(Position(1, 0, 1, 1), saved, EngineSettings(micro_batch=4, accumulation=1, world_size=2))


# ------------------------------------------------------------------------------------------------- a frozen rank
@pytest.mark.slow
def test_a_frozen_rank_ends_a_whole_run_within_the_process_group_timeout(setup, tmp_path):
    """Two ranks of a long run; once training, rank 1 is stopped (SIGSTOP): rank 0 ends with RankTimeoutError's
    message in bounded time, naming the step and the flag."""
    port, out = str(free_port()), tmp_path / "frozen"
    cmd = [sys.executable, "-m", "lxmert_fast.pretrain", "--sample-data-dir", str(setup / "sample_data"),
           "--model-config", str(setup / "tiny.json"), "--valid-batches", "0", "--num-workers", "0",
           "--log-every", "1", "--save-every", "1000", "--epochs", "1000", "--micro-batch-size", "2",
           "--process-group-timeout", "10", "--output-dir", str(out)]
    envs = [clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in (0, 1)]
    procs = start_ranks(cmd, envs)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and "train" in (out / "metrics.jsonl").read_text()):
            assert time.time() < deadline and procs[0].poll() is None, "the run did not start training"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        output = procs[0].communicate(timeout=120)[0]
        waited = time.time() - t0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert procs[0].returncode != 0
    assert "error: rank 0 waited 10 s (--process-group-timeout) for the other ranks at step" in output, output[-3000:]
    assert "continue with --resume" in output, output[-3000:]
    assert waited < 60, waited  # the 10 s timeout plus the way out, not the 120 s allowed
