"""The host side of the training loop itself (issue 22): main-process CPU time per optimiser step with the model's
compute made free, through the real Trainer, engine (--engine torch or DeepSpeed, on the CPU), loader and data.

The objective is one parameter whose losses cost nothing (FreeObjective: no model, no expansion of the compact batch
on the device), so what is left is the loop's own cost per step: receiving the batch from the DataLoader workers and
letting it go, the loss bookkeeping and its checks, the engine's forward/backward/step plumbing, the schedule,
logging. The workers' CPU is theirs (other processes) and not counted; waiting for them is not CPU time.

    python benchmarks/bench_loop.py --engine torch --batch 256
    python benchmarks/bench_loop.py --engine deepspeed --batch 256

Prints one JSON line: main_cpu_ms_per_step (time.process_time of this process, all its threads, between optimiser
steps ``--warmup`` and the last), wall_ms_per_step, the settings and the code's git commit. Target: <= 4 ms at B=256.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    p.add_argument("--batch", type=int, default=256, help="micro-batch size")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps measured")
    p.add_argument("--warmup", type=int, default=5, help="optimiser steps before the measurement")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
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


def measure(args):
    from lxmert_fast.data import (
        AnswerTable,
        FeatureStore,
        PretrainDataset,
        compact_pretrain_collate,
        ensure_sample_data,
    )
    from lxmert_fast.train import loop, pretrain_run

    sample = ensure_sample_data(args.data_dir, num_images=args.images, feat_dim=args.feat_dim)
    out = tempfile.mkdtemp(prefix="bench_loop_")
    total = args.warmup + args.steps
    config = pretrain_run.resolve([
        "--train-json", str(sample.train_json), "--features", str(sample.features_tsv), "--answer-table",
        str(sample.answer_table), "--tokenizer", str(sample.tokenizer_dir), "--output-dir", out, "--engine",
        args.engine, "--micro-batch-size", str(args.batch), "--gradient-accumulation", "1", "--max-steps",
        str(total), "--epochs", "1000", "--save-every", str(10 * total), "--log-every", str(args.log_every),
        "--num-workers", str(args.workers),
    ])
    loop.start(config)
    store = FeatureStore.from_tsv(sample.features_tsv, progress=False)
    train_set = PretrainDataset(sample.train_json, [store], AnswerTable(sample.answer_table), sample.tokenizer_dir,
                                feature_dtype="float16")
    trainer = loop.build_trainer(config, free_objective(), train_set, compact_pretrain_collate, name="bench")
    marks = []
    update = trainer.bar.update

    def mark(n=1):  # called once per optimiser step by the loop
        marks.append((time.process_time(), time.perf_counter()))
        update(n)

    trainer.bar.update = mark
    trainer.fit()
    (cpu0, wall0), (cpu1, wall1) = marks[args.warmup - 1], marks[-1]
    steps = len(marks) - args.warmup
    return {"engine": args.engine, "batch": args.batch, "workers": args.workers, "feat_dim": args.feat_dim,
            "steps": steps, "log_every": args.log_every, "main_cpu_ms_per_step": (cpu1 - cpu0) / steps * 1e3,
            "wall_ms_per_step": (wall1 - wall0) / steps * 1e3, "engine_described": trainer.engine.describe(),
            "commit": _commit()}


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
