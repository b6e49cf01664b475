"""A run's life cycle: its config resolved once, the command line, the output folder, resume and checkpoints.

Everything here is fast: configs resolved without a model, checkpoints of a tiny single-device engine, and the
command lines of pretrain.py / finetune.py stopped by their flag checks (before any training).
"""

import errno
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from helpers import small_config

from lxmert_fast.errors import CheckpointError, ConfigError
from lxmert_fast.train import checkpoints, metrics, sampling
from lxmert_fast.train.run_config import resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")  # a file that exists, for the flags not under test
FLAGS = {"engine": "deepspeed", "seed": 1}


def ds_json(tmp_path, cfg, name="ds.json"):
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(path)


def resolved(tmp_path, cfg, world=1, **flags):
    return resolve("pretrain", {**FLAGS, "deepspeed_config": ds_json(tmp_path, cfg), **flags},
                   default_deepspeed="unused", model={"hidden_size": 32}, world_size=world)


# ------------------------------------------------------------------------------------------- the DeepSpeed JSON
def test_a_users_minimal_deepspeed_json_works_and_the_config_says_what_it_added(tmp_path):
    config = resolved(tmp_path, {"train_batch_size": 8, "zero_optimization": {"stage": 2}})
    engine = config.engine
    assert (engine.micro_batch, engine.accumulation, engine.global_batch) == (8, 1, 8)
    assert engine.deepspeed["zero_allow_untested_optimizer"] is True  # DeepSpeed refuses BertAdam under ZeRO without
    assert any("zero_allow_untested_optimizer" in note for note in config.adjustments)
    two = resolved(tmp_path, {"train_batch_size": 8, "zero_optimization": {"stage": 2}}, world=2)
    assert (two.engine.micro_batch, two.engine.deepspeed["train_batch_size"]) == (4, 8)
    assert "adjusted: zero_allow_untested_optimizer" in config.summary()


def test_auto_values_are_filled_as_transformers_trainer_fills_them(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto", "fp16": {"enabled": "auto"},
           "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                 "stage3_param_persistence_threshold": "auto"}}
    config = resolved(tmp_path, cfg, world=2, micro_batch_size=4, gradient_accumulation=2)
    ds = config.engine.deepspeed
    assert [ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")] == [
        4, 2, 16]
    assert ds["gradient_clipping"] == 1.0
    assert ds["fp16"]["enabled"] is torch.cuda.is_available()
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_param_persistence_threshold"]) == (32 * 32, 320)
    with pytest.raises(ConfigError, match=r"ds.json: train_micro_batch_size_per_gpu is \"auto\": give --micro-batch"):
        resolved(tmp_path, cfg)
    with pytest.raises(ConfigError, match=r"ds.json: no value to fill in for \"auto\" at wall_clock_breakdown"):
        resolved(tmp_path, {"train_batch_size": 8, "wall_clock_breakdown": "auto"})


def test_batch_flags_edit_the_resolved_deepspeed_config_visibly(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1, "train_batch_size": 32}
    config = resolved(tmp_path, cfg, micro_batch_size=8, gradient_accumulation=4)
    ds = config.engine.deepspeed
    assert [ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")] == [
        8, 4, 32]
    assert "train_micro_batch_size_per_gpu 32 -> 8 (--micro-batch-size)" in config.adjustments
    assert "gradient_accumulation_steps 1 -> 4 (--gradient-accumulation)" in config.adjustments


def test_a_contradicting_train_batch_size_is_an_error_naming_the_values(tmp_path):
    cfg = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1}
    with pytest.raises(ConfigError, match=r"ds.json: train_batch_size 64 != train_micro_batch_size_per_gpu 32 x "
                                          r"gradient_accumulation_steps 1 x 1 rank\(s\) = 32"):
        resolved(tmp_path, cfg)
    assert resolved(tmp_path, cfg, world=2).engine.global_batch == 64  # right for two ranks


@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_a_micro_batch_below_one_is_an_error_naming_the_file_and_key(tmp_path, value):
    cfg = {"train_micro_batch_size_per_gpu": value, "gradient_accumulation_steps": 1}
    with pytest.raises(ConfigError, match=rf"ds.json: train_micro_batch_size_per_gpu is {value}; it must be a whole"):
        resolved(tmp_path, cfg)


def test_malformed_json_is_an_error_naming_the_file_line_and_column(tmp_path):
    path = ds_json(tmp_path, '{\n  "train_batch_size": 8,\n}\n')
    with pytest.raises(ConfigError, match=rf"{path}:3:1: not valid JSON .*expected a DeepSpeed config"):
        resolved(tmp_path, '{\n  "train_batch_size": 8,\n}\n')


def test_precision_and_engine_adjustments_are_made_in_the_config(tmp_path, monkeypatch):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "fp16": {"enabled": True}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = resolved(tmp_path, cfg)
    assert config.engine.precision == "fp32" and config.engine.deepspeed["fp16"]["enabled"] is False
    assert any("training in fp32 instead" in note for note in config.adjustments)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    torch_engine = resolved(tmp_path, cfg, engine="torch")
    assert (torch_engine.engine.precision, torch_engine.engine.cuda_graphs) == ("bf16", False)  # accumulation: no graph
    assert any("fp16 runs as bf16 autocast" in n for n in torch_engine.adjustments)
    assert any("runs eagerly, without CUDA graphs" in n for n in torch_engine.adjustments)
    with pytest.raises(ConfigError, match="2 ranks: use --engine deepspeed"):
        resolved(tmp_path, cfg, world=2, engine="torch")


def test_resuming_with_another_seed_batch_ranks_or_model_names_both_values(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}
    saved = json.loads(resolved(tmp_path, cfg).to_json())
    resolved(tmp_path, cfg).check_resume(saved, "out/run_config.json")  # the same run: fine
    cases = [
        (resolved(tmp_path, cfg, seed=2), r"seed is 2, the run in out/run_config.json had 1"),
        (resolved(tmp_path, cfg, micro_batch_size=8), r"global batch is 8 \(micro-batch 8 x accumulation 1 x 1"),
        (resolved(tmp_path, cfg, world=2), r"global batch is 8 \(micro-batch 4 x accumulation 1 x 2 rank\(s\)\), "
         r"the run in out/run_config.json had 4 \(micro-batch 4 x accumulation 1 x 1 rank\(s\)\): keep it with "
         r"--micro-batch-size 2 --gradient-accumulation 1"),
    ]
    other_model = resolve("pretrain", {**FLAGS, "deepspeed_config": ds_json(tmp_path, cfg)}, default_deepspeed="x",
                          model={"hidden_size": 64}, world_size=1)
    cases.append((other_model, r"model is \{'hidden_size': 64\}, the run in .* had \{'hidden_size': 32\}"))
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            config.check_resume(saved, "out/run_config.json")


def test_a_run_config_json_of_the_flat_layout_before_the_sections_is_still_compared(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}
    flat = {"flags": {"seed": 1}, "micro_batch": 4, "accumulation": 1, "world_size": 1, "model": {"hidden_size": 32}}
    resolved(tmp_path, cfg).check_resume(flat, "old/run_config.json")
    with pytest.raises(ConfigError, match="seed is 2, the run in old/run_config.json had 1"):
        resolved(tmp_path, cfg, seed=2).check_resume(flat, "old/run_config.json")


# --------------------------------------------------------------------------------------------- command line
def _command(script, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, "lxmert_fast", script), *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py"])
def test_help_is_quick_and_shows_every_default(script):
    """--help imports none of torch, transformers and DeepSpeed: it takes well under a second of CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = _command(script, "--help")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 1.0, cpu
    text = " ".join(proc.stdout.split())
    assert "(default: 9595)" in text and "(default: bertadam)" in text and "(default: 10)" in text
    assert "--inject-nan-at-step" not in text
    code = f"import sys, runpy; sys.argv = ['{script}', '--help']\ntry:\n    runpy.run_path({script!r}, " \
           "run_name='__main__')\nexcept SystemExit:\n    print(sorted({'torch', 'transformers', 'deepspeed'} & " \
           "set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ,
                         PYTHONPATH=REPO), cwd=os.path.join(REPO, "lxmert_fast"))
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("args, message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--save-every", "0"], "argument --save-every: must be 1 or more, got 0"),
    (["--log-every", "0"], "argument --log-every: must be 1 or more, got 0"),
    (["--features", "missing.tsv", "--train-json", "missing.json", "--answer-table", "a", "--tokenizer", "t"],
     "no such file or folder: --train-json missing.json; --features missing.tsv; --answer-table a"),
    (["--deepspeed_config", "nowhere.json", "--train-json", README, "--features", README, "--answer-table", README,
      "--tokenizer", "t"], "nowhere.json': no such file, and no shipped config of that name"),
])
def test_a_wrong_flag_file_or_value_is_one_line_before_deepspeed_starts(tmp_path, args, message):
    proc = _command("pretrain.py", *args, "--sample-data-dir", str(tmp_path / "s"), cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in proc.stderr, proc.stderr


def test_malformed_config_json_names_file_line_and_column(tmp_path):
    bad = tmp_path / "recipe.json"
    bad.write_text('{"epochs": 2,,}')
    proc = _command("finetune.py", "--task", "vqa", "--config", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and f"{bad}:1:14: not valid JSON" in proc.stderr.strip().splitlines()[-1]


def test_importing_training_code_sets_no_environment():
    code = ("import os; import lxmert_fast.train.loop, lxmert_fast.train.engines, lxmert_fast.train.distributed; "
            "print(os.environ.get('DS_ACCELERATOR'))")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "None"


# ------------------------------------------------------------------------------ output folder and checkpoints
def _config(tmp_path, **flags):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    base = dict(output_dir=str(tmp_path / "out"), resume=False, overwrite=False, keep_checkpoints=2)
    return resolved(tmp_path, cfg, **{**base, **flags})


def test_a_second_run_refuses_a_folder_holding_another_run(tmp_path):
    from lxmert_fast.train.loop import prepare_output_dir

    prepare_output_dir(_config(tmp_path))  # a new folder: claimed
    assert (tmp_path / "out" / "run_config.json").is_file()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    with pytest.raises(ConfigError, match=r"holds another run \(metrics.jsonl, run_config.json\): continue it with"):
        prepare_output_dir(_config(tmp_path))
    prepare_output_dir(_config(tmp_path, resume=True))  # the same run continues
    assert (tmp_path / "out" / "metrics.jsonl").is_file()
    prepare_output_dir(_config(tmp_path, overwrite=True))  # replaced: the old metrics are gone
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="seed is 5, the run in"):
        prepare_output_dir(_config(tmp_path, resume=True, seed=5))


def _engine():
    from lxmert_fast import LxmertForPreTraining
    from lxmert_fast.train.objectives import PretrainingObjective
    from lxmert_fast.train.optimization import BertAdam, build_scheduler
    from lxmert_fast.train.single_device import SingleDeviceEngine

    torch.manual_seed(0)
    objective = PretrainingObjective(LxmertForPreTraining(small_config("tiny"), backend="torch"))
    optimizer = BertAdam(objective.parameters(), lr=1e-3)
    return SingleDeviceEngine(objective, optimizer, build_scheduler(optimizer, 10), device="cpu", precision="fp32")


def test_a_failed_checkpoint_write_names_the_path_and_cause_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    engine, ckpt = _engine(), tmp_path / "checkpoints"
    checkpoints.save_checkpoint(engine, str(ckpt), 2, {"step": 2})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step000000004: the disk is full writing "
                                              r".*step000000004/state.pt \(No space left on device\); \d+ MiB free "
                                              r".*; the last good checkpoint .*step000000002 is kept \(latest still"):
        checkpoints.save_checkpoint(engine, str(ckpt), 4, {"step": 4})
    assert (ckpt / "latest").read_text() == "step000000002" and not (ckpt / "step000000004").exists()
    assert checkpoints.load_checkpoint(engine, str(ckpt))[1] == {"step": 2}


def test_torch_saves_short_write_is_named_as_a_full_disk_and_keeps_the_last_good_one(tmp_path):
    """A real short write: the file size limit (RLIMIT_FSIZE) stops torch.save part-way as a full disk does, with
    its RuntimeError "[enforce fail at inline_container.cc:...] . unexpected pos ..." and no errno."""
    import signal

    engine, ckpt = _engine(), tmp_path / "checkpoints"
    checkpoints.save_checkpoint(engine, str(ckpt), 2, {"step": 2})
    size = (ckpt / "step000000002" / "state.pt").stat().st_size
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limits[1]))
    try:
        with pytest.raises(CheckpointError, match=r"step000000004: writing .*step000000004/state.pt stopped "
                                                  r"part-way, most likely the disk is full \(torch.save: \[enforce "
                                                  r"fail at inline_container.cc:\d+\] . unexpected pos"):
            checkpoints.save_checkpoint(engine, str(ckpt), 4, {"step": 4})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert (ckpt / "latest").read_text() == "step000000002" and not (ckpt / "step000000004").exists()
    assert checkpoints.load_checkpoint(engine, str(ckpt))[1] == {"step": 2}


class PartialWriter:
    """An engine that writes its files in place, as DeepSpeed's does, and fails on the second with torch.save's
    short-write error."""

    def save(self, ckpt_dir, tag, client_state):
        os.makedirs(os.path.join(ckpt_dir, tag))
        with open(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"complete")
        os.utime(f.name, (1, 1))  # written well before the next (file times are coarser than two quick writes)
        with open(os.path.join(ckpt_dir, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb") as f:
            f.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4624")


def test_an_engine_writing_in_place_names_the_file_it_stopped_in(tmp_path):
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match=r"writing .*step000000004/zero_pp_rank_0_mp_rank_00_optim_states.pt "
                                              r"stopped part-way, most likely the disk is full.*; no checkpoint kept"):
        checkpoints.save_checkpoint(PartialWriter(), str(ckpt), 4, {"step": 4})
    assert not (ckpt / "step000000004").exists()

    class Buggy(PartialWriter):
        def save(self, *args):
            raise RuntimeError("a bug of ours")

    with pytest.raises(RuntimeError, match="a bug of ours"):  # not a write failure: not turned into one
        checkpoints.save_checkpoint(Buggy(), str(ckpt), 4, {"step": 4})


def test_rotation_keeps_the_newest_and_drops_a_killed_runs_later_tags(tmp_path):
    engine, ckpt = _engine(), tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        checkpoints.save_checkpoint(engine, str(ckpt), step, {}, keep=2)
    assert sorted(os.listdir(ckpt)) == ["latest", "step000000006", "step000000008"]
    (ckpt / "latest").write_text("step000000006")  # resumed from 6 after a kill: 8 is the killed run's
    checkpoints.save_checkpoint(engine, str(ckpt), 7, {}, keep=2)
    assert sorted(os.listdir(ckpt)) == ["latest", "step000000006", "step000000007"]


def test_latest_pointing_to_a_missing_folder_is_an_error_and_deletes_nothing(tmp_path):
    engine, ckpt = _engine(), tmp_path / "checkpoints"
    checkpoints.save_checkpoint(engine, str(ckpt), 2, {}, keep=2)
    (ckpt / "latest").write_text("step000000004")
    with pytest.raises(CheckpointError, match=r"points to 'step000000004', which is not in .* \(it holds "
                                                       r"\['step000000002'\]\)"):
        checkpoints.load_checkpoint(engine, str(ckpt))
    assert (ckpt / "step000000002").is_dir()


def test_metrics_are_cut_back_on_resume_also_before_the_first_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1}\n{"event": "train", "step": 2}\n{"event": "eval", "step": 2}\n'
                    '{"event": "train", "st')
    metrics.truncate_metrics(str(path), 0)  # killed before the first checkpoint: nothing of it is kept
    assert path.read_text() == ""
    path.write_text('{"event": "train", "step": 1}\n{"event": "train", "step": 2}\n{"event": "end", "step": 2}\n')
    metrics.truncate_metrics(str(path), 1)
    assert path.read_text() == '{"event": "train", "step": 1}\n'


def test_evaluation_batches_keep_the_partial_last_one_and_are_even_over_ranks():
    assert sampling.eval_batches(5, 32, 0, 1) == [[0, 1, 2, 3, 4]]
    ranks = [sampling.eval_batches(5, 2, r, 2) for r in (0, 1)]
    assert ranks == [[[0, 2], [4]], [[1, 3], [0]]]  # rank 1 repeats a sample to run as many batches
    assert sampling.eval_batches(10, 2, 0, 1, limit=2) == [[0, 1], [2, 3]]
