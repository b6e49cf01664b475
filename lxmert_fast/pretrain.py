"""LXMERT pre-training: the five tasks of the paper, DeepSpeed ZeRO + fp16, exact resume.

    deepspeed lxmert_fast/pretrain.py                     # sample data, small model, a minute or two on CPU
    deepspeed --num_gpus 4 lxmert_fast/pretrain.py --config configs/recipe_lxmert_paper.json \
        --train-json data/lxmert/mscoco_train.json,... --features a.tsv,b.tsv --answer-table data/lxmert/all_ans.json
    python lxmert_fast/pretrain.py ...                    # the same, as one process
    python lxmert_fast/pretrain.py --engine torch --deepspeed_config configs/ds_paper_1gpu_bf16.json ...
                                                          # one GPU, no DeepSpeed, the step as a CUDA graph

The DeepSpeed JSON (--deepspeed_config) decides batch size, accumulation, precision and ZeRO stage; everything
else is a flag here, and ``--config FILE.json`` may supply any flag (the command line wins).
"""

import argparse
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a script (deepspeed lxmert_fast/pretrain.py): make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from lxmert_fast import training  # noqa: E402  (sets DS_ACCELERATOR before deepspeed is imported)
from lxmert_fast.modeling import lm_label_capacity, text_token_capacity  # noqa: E402
from lxmert_fast.optimization import build_optimizer, build_scheduler  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
DEFAULT_DS_CONFIG = os.path.join(CONFIG_DIR, "ds_zero2_fp16.json")
TASKS = ("mlm", "matched", "obj", "attr", "feat", "qa")


# ------------------------------------------------------------------------------------------------------ losses
def pretraining_losses(model, batch):
    """The pre-training losses of ``model`` (an LxmertForPreTraining) on a collated batch: ``loss`` (the total)
    and ``{task}_loss`` for each task the model's config switches on.

    The model computes them as transformers does (the total equals transformers' loss on the same batch), with the
    language-model head evaluated only at masked tokens, cross-entropies in fp32, and 0 instead of NaN for a task
    with no label in the batch (a small batch, or QA before --qa-from-epoch).
    """
    out = model(**batch, return_task_losses=True, lm_logits_at_labels_only=True)  # see with_capacities
    losses = {f"{task}_loss": value for task, value in out.task_losses.items()}
    losses["loss"] = out.loss
    return losses


def with_capacities(batch, mask_rate, text_stats):
    """The collated CPU batch with ``lm_label_capacity`` and ``text_token_capacity`` added (see modeling): under
    --compile and CUDA graphs the LM head then runs on ~20% of the text positions instead of all of them, and the
    token-wise layers skip most of the text padding, with the same losses. Counted here, on the host, so the
    checks cost no synchronisation. ``text_stats``: the training set's text_length_stats()."""
    return {
        **batch,
        "lm_label_capacity": lm_label_capacity(batch["labels"], mask_rate),
        "text_token_capacity": text_token_capacity(batch["attention_mask"], *text_stats),
    }


class PretrainingObjective(nn.Module):
    """What DeepSpeed wraps: the model plus its losses, so ``engine(batch)`` returns the loss dict."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return pretraining_losses(self.model, batch)


def apply_task_switches(config, tasks):
    """Mirror the enabled tasks into the LxmertConfig fields, so the saved model has exactly the heads it trained."""
    config.task_mask_lm = "mlm" in tasks
    config.task_matched = "matched" in tasks
    config.visual_obj_loss = "obj" in tasks
    config.visual_attr_loss = "attr" in tasks
    config.visual_feat_loss = "feat" in tasks
    config.task_obj_predict = any(t in tasks for t in ("obj", "attr", "feat"))
    config.task_qa = "qa" in tasks
    return config


# --------------------------------------------------------------------------------------------------- arguments
def build_parser():
    p = argparse.ArgumentParser(description="LXMERT pre-training (DeepSpeed).")
    p.add_argument("--config", help="JSON file of default values for any of these flags (the command line wins)")
    data = p.add_argument_group("data (default: the generated sample data set)")
    data.add_argument("--train-json", help="comma-separated pre-training JSON files (sentf/labelf records)")
    data.add_argument("--valid-json", help="comma-separated JSON files for a validation loss after each epoch")
    data.add_argument("--valid-batches", type=int, default=50, help="validation micro-batches per rank (0: none)")
    data.add_argument("--features", help="comma-separated object-feature TSV files (converted once to a store)")
    data.add_argument("--answer-table", help="all_ans.json")
    data.add_argument("--tokenizer", help="tokenizer folder or hub name (default: the sample data's vocabulary)")
    data.add_argument("--sample-data-dir", default="sample_data", help="where sample data is generated if needed")
    data.add_argument("--num-workers", type=int, default=None, help="data-loader workers (default: min(8, cores/2))")
    data.add_argument("--strict", action="store_true", help="refuse annotation records whose image has no features")
    model = p.add_argument_group("model and schedule")
    model.add_argument(
        "--model-config",
        default="lxmert_small",
        help="config.json of LxmertConfig fields, or a preset in configs/ (lxmert_small, lxmert_base)",
    )
    model.add_argument("--output-dir", default=os.path.join("output", "pretrain"))
    model.add_argument("--epochs", type=int, default=1)
    model.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    model.add_argument("--seed", type=int, default=9595)
    model.add_argument(
        "--qa-from-epoch",
        type=int,
        default=0,
        help="first epoch (0-based) with the QA loss; the paper: 10 of 20, the released code: 0",
    )
    model.add_argument("--optimizer", choices=("bertadam", "adamw"), default="bertadam")
    model.add_argument("--lr", type=float, default=1e-4)
    model.add_argument("--weight-decay", type=float, default=0.01)
    model.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the total steps")
    for task, what in (
        ("mlm", "masked language model"),
        ("matched", "cross-modality matching"),
        ("obj", "object-label classification"),
        ("attr", "attribute classification"),
        ("feat", "RoI-feature regression"),
        ("qa", "image question answering"),
    ):
        model.add_argument(f"--no-{task}", action="store_true", help=f"switch off the {what} task")
    run = p.add_argument_group("logging and checkpoints")
    run.add_argument("--save-every", type=int, default=200, help="checkpoint every N optimiser steps")
    run.add_argument("--keep-checkpoints", type=int, default=2)
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest")
    run.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    run.add_argument("--inject-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests
    training.add_engine_arguments(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = training.parse_args_with_config(parser, argv)
    if args.deepspeed_config is None:
        args.deepspeed_config = DEFAULT_DS_CONFIG
    elif not os.path.isfile(args.deepspeed_config) and os.path.isfile(os.path.join(REPO_ROOT, args.deepspeed_config)):
        args.deepspeed_config = os.path.join(REPO_ROOT, args.deepspeed_config)  # e.g. "configs/..." from a recipe
    args.tasks = tuple(t for t in TASKS if not getattr(args, f"no_{t}"))
    if not args.tasks:
        parser.error("every task is switched off")
    return args


def resolve_model_config(name):
    """A config.json path, or a preset name in configs/ (``lxmert_small`` or ``lxmert_small.json``)."""
    from lxmert_fast.checks import load_model_config

    for path in (name, os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, f"{name}.json")):
        if os.path.isfile(path):
            return load_model_config(path)
    raise FileNotFoundError(f"--model-config {name!r}: neither a file nor a preset in {CONFIG_DIR}")


# -------------------------------------------------------------------------------------------------------- data
def build_data(args, config):
    """Datasets and the collate function; fills ``config``'s vocabulary and answer-table sizes from the data."""
    from lxmert_fast import data as lxdata
    from lxmert_fast.checks import check_features

    if args.train_json is None:
        paths = lxdata.ensure_sample_data(args.sample_data_dir)
        args.train_json, args.valid_json = str(paths.train_json), args.valid_json or str(paths.valid_json)
        args.features = args.features or str(paths.features_tsv)
        args.answer_table = args.answer_table or str(paths.answer_table)
        args.tokenizer = args.tokenizer or str(paths.tokenizer_dir)
    missing = [f for f in ("features", "answer_table", "tokenizer") if getattr(args, f) is None]
    if missing:
        raise SystemExit(f"--train-json given without {', '.join('--' + m.replace('_', '-') for m in missing)}")
    stores = [lxdata.FeatureStore.from_tsv(path) for path in _split(args.features)]  # converted once, then mapped
    # features travel as stored (float16, half the bytes); training.to_device casts them to the model's dtype
    common = dict(seed=args.seed, task_matched="matched" in args.tasks, feature_dtype="float16", strict=args.strict)
    train = lxdata.PretrainDataset(
        _split(args.train_json),
        stores,
        lxdata.AnswerTable(args.answer_table),
        str(args.tokenizer),
        qa_from_epoch=args.qa_from_epoch,
        **common,
    )
    valid = None
    if args.valid_json and args.valid_batches > 0:  # QA always on: the validation loss covers every task
        valid = lxdata.PretrainDataset(_split(args.valid_json), stores, train.answer_table, train.tokenizer, **common)
    config.vocab_size = train.vocab_size
    config.num_qa_labels = len(train.answer_table)
    check_features(stores, config, labels=config.visual_obj_loss or config.visual_attr_loss)
    return train, valid, lxdata.pretrain_collate


def _split(value):
    if value is None:
        return []
    return value if isinstance(value, (list, tuple)) else [v for v in value.split(",") if v]


# ----------------------------------------------------------------------------------------------------- training
def save_hf_model(model, out_dir):
    """config.json + model.safetensors in fp32, loadable by lxmert_fast's and transformers' from_pretrained."""
    from lxmert_fast import LxmertForPreTraining

    copy = LxmertForPreTraining(model.config, backend="torch")
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    copy.save_pretrained(out_dir)


def make_loader(dataset, batches, collate, num_workers):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


@torch.no_grad()
def validate(engine, valid_set, collate, micro, args, dtype, num_workers, text_stats):
    """Mean losses over the first --valid-batches micro-batches per rank (fixed masking: epoch 0, no dropout)."""
    engine.eval()
    valid_set.set_epoch(0)
    rank, world = training.rank(), training.world_size()
    batches = training.epoch_batches(len(valid_set), micro, args.seed, 0, rank, world)[: args.valid_batches]
    sums, count = {}, 0
    for batch in make_loader(valid_set, batches, collate, num_workers):
        batch = with_capacities(batch, valid_set.word_mask_rate, text_stats)
        batch = training.to_device(batch, engine.device, dtype)
        values, _ = training.reduce_losses(engine(batch), engine.device)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
    engine.train()
    return {f"valid_{k}": v / count for k, v in sorted(sums.items())} if count else {}


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    rank, world, ds_config, precision, micro, accum, ckpt_dir = training.start_run(args)

    from lxmert_fast import LxmertForPreTraining

    config = apply_task_switches(resolve_model_config(args.model_config), args.tasks)
    if training.is_main():  # rank 0 builds sample data and the feature store; the others wait and reuse them
        train_set, valid_set, collate = build_data(args, config)
    training.barrier()
    if not training.is_main():
        train_set, valid_set, collate = build_data(args, config)

    text_stats = train_set.text_length_stats()  # for text_token_capacity (see with_capacities)
    micro_per_epoch = training.num_micro_batches(len(train_set), micro, world) // accum * accum
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} samples are fewer than one global batch ({micro * world * accum})")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps) if args.max_steps > 0 else total_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = args.epochs

    plan = training.plan_engine(args, precision, world, accum)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    model = LxmertForPreTraining(config, backend=plan.model_backend)
    objective = PretrainingObjective(model)
    optimizer = build_optimizer(objective.parameters(), args.optimizer, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, args.warmup)
    engine, dtype = training.build_engine(plan, objective, optimizer, scheduler, ds_config)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 leaves p empty
    training.print0(
        f"LXMERT pre-training: {n_params / 1e6:.1f}M parameters, {len(train_set)} samples, {world} rank(s) on "
        f"{engine.device}, {plan.precision}, {plan.describe(engine)}, micro-batch {micro} x accumulation "
        f"{accum} x {world} = {micro * accum * world}, {steps_per_epoch} steps/epoch, {total_steps} steps, "
        f"tasks {','.join(args.tasks)}, optimizer {args.optimizer} lr {args.lr}"
    )

    step, epoch, pos, micro_step = 0, 0, 0, 0
    last_ckpt = None
    if args.resume:
        last_ckpt, state = training.load_checkpoint(engine, ckpt_dir)
        if last_ckpt is None:
            training.print0(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
        else:
            step, epoch, pos, micro_step = state["step"], state["epoch"], state["pos"], state["micro_step"]
            training.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
            training.print0(f"resumed from {os.path.join(ckpt_dir, last_ckpt)}: step {step}, epoch {epoch}")
            if training.is_main():
                training.truncate_metrics(os.path.join(args.output_dir, "metrics.jsonl"), step)
    training.barrier()

    metrics = training.MetricsLogger(args.output_dir, enabled=training.is_main())
    bar = training.progress_bar(total_steps, initial=step, desc="pretrain")
    timer = training.Timer()
    sums, count, first_loss, last_loss = {}, 0, None, None

    def checkpoint():
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, training.rng_state())
        state = {"step": step, "epoch": epoch, "pos": pos, "micro_step": micro_step, "rng": rngs, "seed": args.seed}
        return training.save_checkpoint(engine, ckpt_dir, step, state, keep=args.keep_checkpoints)

    validated_at = None

    def run_validation():
        nonlocal validated_at
        if valid_set is not None:
            record = validate(engine, valid_set, collate, micro, args, dtype, num_workers, text_stats)
            metrics.log({"event": "valid", "step": step, "epoch": epoch, **record})
            training.print0(f"validation at step {step}: loss {record.get('valid_loss', float('nan')):.4f}")
        validated_at = step

    def check_losses(losses):
        """The losses' values averaged over ranks; a NaN or inf stops the run before the weights are updated."""
        if args.inject_nan_at_step is not None and step + 1 == args.inject_nan_at_step:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        values, bad = training.reduce_losses(losses, engine.device)
        if bad:
            where = (
                f"the last good checkpoint is {os.path.join(ckpt_dir, last_ckpt)}"
                if last_ckpt
                else "no checkpoint was written yet"
            )
            raise training.NonFiniteLossError(
                f"non-finite loss at step {step + 1} (epoch {epoch}, micro-batch {pos}): "
                f"{ {k: losses[k].item() for k in sorted(losses)} }; weights were not updated; {where}"
            )
        return values

    # one worker process delivers about 1,500-2,000 samples/s (benchmarks/bench_data.py); a graphed step takes 6,400
    num_workers = args.num_workers if args.num_workers is not None else min(8, (os.cpu_count() or 2) // 2)
    try:
        while step < total_steps and epoch < epochs:
            train_set.set_epoch(epoch)
            batches = training.epoch_batches(len(train_set), micro, args.seed, epoch, rank, world, start=pos)
            batches = batches[: micro_per_epoch - pos]
            loader = make_loader(train_set, batches, collate, num_workers)
            for batch in loader:
                training.seed_step(args.seed, micro_step, rank)
                batch = with_capacities(batch, train_set.word_mask_rate, text_stats)
                batch = training.to_device(batch, engine.device, dtype)
                lr = scheduler.get_last_lr()[0]  # the rate this update uses (the scheduler moves on in step())
                values = training.train_micro_batch(engine, batch, check_losses)
                micro_step += 1
                pos += 1
                timer.add(micro * world)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if micro_step % accum:
                    continue
                step += 1
                bar.update(1)
                if step % args.log_every == 0 or step == total_steps:
                    record = {"step": step, "epoch": epoch, "lr": lr}
                    record.update({k: v / count for k, v in sorted(sums.items())})
                    record["samples_per_s"] = timer.rate()
                    scale = training.loss_scale(engine)
                    if scale is not None:
                        record["loss_scale"] = scale
                        record["skipped_steps"] = int(engine.skipped_steps)
                    record.update(training.graph_counters(engine))
                    metrics.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    first_loss = record["loss"] if first_loss is None else first_loss
                    last_loss = record["loss"]
                    sums, count = {}, 0
                if step % args.save_every == 0 or step == total_steps:
                    last_ckpt = checkpoint()
                if step >= total_steps:
                    break
            if pos >= micro_per_epoch:
                run_validation()
                epoch, pos = epoch + 1, 0
        if validated_at != step:
            run_validation()
    finally:
        bar.close()

    final_dir = os.path.join(args.output_dir, "final_model")
    with training.full_parameters(engine, model):  # ZeRO-3 holds only a shard of each parameter per rank
        if training.is_main():
            save_hf_model(model, final_dir)
    total_time = time.perf_counter() - t_start
    metrics.log(
        {
            "event": "end",
            "step": step,
            "total_time_s": total_time,
            "skipped_steps": int(engine.skipped_steps),
            "first_loss": first_loss,
            "last_loss": last_loss,
        }
    )
    metrics.close()
    training.print0(
        f"done: {step} steps in {total_time:.1f} s, loss {first_loss} -> {last_loss}; "
        f"model in {final_dir}, metrics in {metrics.path}"
    )
    training.shutdown()


if __name__ == "__main__":
    try:
        main()
    except training.NonFiniteLossError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
