"""The host side of the training loop itself (issue 22), through the real Trainer, engine (--engine torch or
DeepSpeed), loader and data.

    --model free (default)  the objective is one parameter whose losses cost nothing (FreeObjective: no model, no
                            expansion of the compact batch on the device), so what is measured is the loop's own cost
                            per step: receiving the batch from the DataLoader workers and letting it go, the loss
                            bookkeeping and its checks, the engine's forward/backward/step plumbing, the schedule,
                            logging. The workers' CPU is theirs (other processes) and not counted; waiting for them
                            is not CPU time. Target: main_cpu_ms_per_step <= 4 at B = 256, both engines.
    --model real            pretrain.py's model and objective (pretrain_run.pretraining_trainer, --model-config):
    --data real (default)   samples/s end to end, the workers feeding the step;
    --data repeat           samples/s of the step alone: one batch, built once (pinned on a GPU), given again for
                            every micro-batch; its copy to the device and its expansion there stay in the step.

    python benchmarks/bench_loop.py --engine torch --batch 256
    python benchmarks/bench_loop.py --engine deepspeed --batch 256
    python benchmarks/bench_loop.py --model real --data repeat --model-config lxmert_base --precision bf16   # GPU

The sample data's annotation file is listed as often as it takes for one epoch to outlast the run, so no epoch-end
hook or checkpoint falls inside the measurement. Prints one JSON line: main_cpu_ms_per_step (time.process_time of
this process, all its threads, between optimiser steps ``--warmup`` and the last), wall_ms_per_step and
samples_per_s (wall time; on a GPU the device is synchronised at those two steps only), the settings and the code's
git commit. benchmarks/bench_host.py runs the free-model case of both engines in the pytest harness.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    p.add_argument("--model", choices=("free", "real"), default="free")
    p.add_argument("--data", choices=("real", "repeat"), default="real")
    p.add_argument("--model-config", default="lxmert_base", help="with --model real: a preset or config.json")
    p.add_argument("--precision", choices=("fp16", "bf16"), default=None,
                   help="DeepSpeed JSON configs/ds_zero2_<precision>.json (default: bf16 on a GPU, else fp16, which "
                        "a CPU run turns into fp32)")
    p.add_argument("--batch", type=int, default=256, help="micro-batch size")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps measured")
    p.add_argument("--warmup", type=int, default=5, help="optimiser steps before the measurement")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--fresh-memory", action="store_true",
                   help="the workers send each batch in a fresh shared-memory segment (as before the batch ring)")
    p.add_argument("--images", type=int, default=300, help="sample-data images (about 5 sentences each)")
    p.add_argument("--feat-dim", type=int, default=2048)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "lxmert_fast_bench_loop_data"))
    return p.parse_args(argv)


def free_objective():
    import torch

    class FreeObjective(torch.nn.Module):
        """The objective protocol (lxmert_fast.train.objectives) at no compute: the batch is not read."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def prepare(self, batch):
            return batch

        def fits(self, batch):
            return False

        def forward(self, batch, static=False):
            loss = self.weight.sum()
            return {"loss": loss, "mlm_loss": loss * 0.5, "matched_loss": loss * 0.25}

    return FreeObjective()


class RepeatedBatch:
    """Stands in for the run's DataLoader (same batch sampler): its first batch, built once in this process, given
    for every micro-batch."""

    def __init__(self, loader):
        self.batch_sampler = loader.batch_sampler
        self.batch_sampler.set_epoch(0, 0, 1)
        keys = next(iter(self.batch_sampler))
        self.batch = loader.collate_fn(loader.dataset.__getitems__(keys))
        if loader.pin_memory:
            self.batch = self.batch.pin_memory()

    def __iter__(self):
        for _ in range(len(self.batch_sampler)):
            yield self.batch


def _config(args, sample, out):
    from lxmert_fast.train import pretrain_run

    sentences = sum(len(s) for r in json.load(open(sample.train_json)) for s in r["sentf"].values())
    copies = math.ceil((args.warmup + args.steps + 2) * args.batch / sentences)  # one epoch outlasts the run
    precision = args.precision or ("bf16" if _cuda() else "fp16")
    total = args.warmup + args.steps
    return pretrain_run.resolve([
        "--train-json", ",".join([str(sample.train_json)] * copies), "--features", str(sample.features_tsv),
        "--answer-table", str(sample.answer_table), "--tokenizer", str(sample.tokenizer_dir), "--output-dir", out,
        "--engine", args.engine, "--deepspeed_config", os.path.join(REPO, "configs", f"ds_zero2_{precision}.json"),
        "--model-config", args.model_config, "--micro-batch-size", str(args.batch), "--gradient-accumulation", "1",
        "--max-steps", str(total), "--epochs", "1", "--save-every", str(10 * total), "--log-every",
        str(args.log_every), "--num-workers", str(args.workers),
    ])


def _cuda():
    import torch

    return torch.cuda.is_available()


def _trainer(args, config):
    from lxmert_fast.data import AnswerTable, FeatureStore, PretrainDataset, compact_pretrain_collate
    from lxmert_fast.train import loop, pretrain_run

    if args.model == "real":
        return pretrain_run.pretraining_trainer(config)
    loop.start(config)
    data = config.data
    store = FeatureStore.from_tsv(data.features, progress=False)
    train_set = PretrainDataset(data.train_json.split(","), [store], AnswerTable(data.answer_table), data.tokenizer,
                                feature_dtype="float16")
    return loop.build_trainer(config, free_objective(), train_set, compact_pretrain_collate, name="bench")


def measure(args):
    import torch

    from lxmert_fast.data import ensure_sample_data

    sample = ensure_sample_data(args.data_dir, num_images=args.images, feat_dim=args.feat_dim)
    trainer = _trainer(args, _config(args, sample, tempfile.mkdtemp(prefix="bench_loop_")))
    if args.fresh_memory:
        trainer.train_set.slot_bytes = None  # hides the method: feed.training_loader makes no ring
    if args.data == "repeat":
        trainer._loader = RepeatedBatch(trainer.training_loader())
    marks, update = [], trainer.bar.update
    synced = {args.warmup - 1, args.warmup + args.steps - 1}  # the marks the device is synchronised at

    def mark(n=1):  # called once per optimiser step by the loop
        if len(marks) in synced and torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append((time.process_time(), time.perf_counter()))
        update(n)

    trainer.bar.update = mark
    trainer.fit()
    (cpu0, wall0), (cpu1, wall1) = marks[args.warmup - 1], marks[-1]
    steps = len(marks) - args.warmup
    settings = {k: getattr(args, k) for k in ("engine", "model", "data", "batch", "workers", "fresh_memory",
                                               "feat_dim", "log_every")}
    return {**settings, "steps": steps, "main_cpu_ms_per_step": (cpu1 - cpu0) / steps * 1e3,
            "wall_ms_per_step": (wall1 - wall0) / steps * 1e3, "samples_per_s": steps * args.batch / (wall1 - wall0),
            "engine_described": trainer.engine.describe(), "device": str(trainer.engine.device), "commit": _commit()}


def _commit():
    """The commit of the lxmert_fast measured (run against another checkout with PYTHONPATH)."""
    import lxmert_fast

    here = os.path.dirname(os.path.abspath(lxmert_fast.__file__))
    try:
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    print(json.dumps(measure(parse(sys.argv[1:]))), flush=True)
