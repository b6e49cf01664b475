"""LXMERT fine-tuning and evaluation on VQA v2, GQA and NLVR2 (DeepSpeed; plain python runs as one process).

    deepspeed lxmert_fast/finetune.py --task vqa          # sample data, from a sample pre-trained model (made if
                                                          # absent), a few minutes on CPU
    deepspeed --num_gpus 4 lxmert_fast/finetune.py --task vqa --load-lxmert-qa snap/pretrained/model_LXRT.pth \
        --train data/vqa/train.json,data/vqa/nominival.json --valid data/vqa/minival.json \
        --features data/mscoco_imgfeat/train2014_obj36.tsv,data/mscoco_imgfeat/val2014_obj36.tsv \
        --ans2label data/vqa/trainval_ans2label.json --answer-table data/lxmert/all_ans.json \
        --tokenizer bert-base-uncased
    python lxmert_fast/finetune.py --task vqa --load output/finetune_vqa/best_model --epochs 0 --test \
        --test-json data/vqa/test.json ...                # evaluate / write the submission file only

Per epoch: train, then evaluate on --valid (metrics.jsonl gets `eval_score`, the task's main metric; the best
model is kept in OUTPUT_DIR/best_model). At the end: OUTPUT_DIR/final_model, and with --test the submission file.
The DeepSpeed JSON (--deepspeed_config, default configs/ds_finetune_fp16.json: batch 32, clipping 5.0) decides
batch size, precision and ZeRO; the task's learning rate, epochs and warm-up default to the original's.
``--engine torch`` trains on one device without DeepSpeed, the step replayed as a CUDA graph on a GPU (see
lxmert_fast/single_device.py).
"""

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lxmert_fast import training  # noqa: E402  (sets DS_ACCELERATOR before deepspeed is imported)
from lxmert_fast.data.finetune_dataset import AnswerVocab, NLVR2Dataset, QADataset, finetune_collate  # noqa: E402
from lxmert_fast.evaluation import SUBMISSION_NAME, evaluate, question_only_note, write_submission  # noqa: E402
from lxmert_fast.modeling import text_token_capacity  # noqa: E402
from lxmert_fast.optimization import build_optimizer, build_scheduler  # noqa: E402
from lxmert_fast.pretrain import CONFIG_DIR, REPO_ROOT, resolve_model_config  # noqa: E402
from lxmert_fast.tasks import LABEL2ANS_FILE, TASKS, FinetuneObjective, build_task_model, predict  # noqa: E402

deepspeed = training.deepspeed  # imported there, once DS_ACCELERATOR is set

DEFAULT_DS_CONFIG = os.path.join(CONFIG_DIR, "ds_finetune_fp16.json")


# --------------------------------------------------------------------------------------------------- arguments
def build_parser():
    p = argparse.ArgumentParser(description="LXMERT fine-tuning: VQA, GQA, NLVR2 (DeepSpeed).")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--config", help="JSON file of default values for any of these flags (the command line wins)")
    data = p.add_argument_group("data (default: the generated sample data of the task)")
    data.add_argument("--train", help="comma-separated annotation JSON files to train on")
    data.add_argument("--valid", help="comma-separated annotation JSON files to evaluate on after each epoch")
    data.add_argument("--test-json", help="comma-separated annotation JSON files to predict with --test")
    data.add_argument("--features", help="comma-separated object-feature TSV files (converted once to a store)")
    data.add_argument("--ans2label", help="VQA / GQA answer vocabulary, trainval_ans2label.json")
    data.add_argument("--label2ans", help="its trainval_label2ans.json (default: the sibling file, if there)")
    data.add_argument("--answer-table", help="the pre-training all_ans.json (for --load-lxmert-qa)")
    data.add_argument("--tokenizer", help="tokenizer folder or hub name (default: bert-base-uncased)")
    data.add_argument("--sample-data-dir", default="sample_data", help="where sample data is generated if needed")
    data.add_argument("--num-workers", type=int, default=None, help="data-loader workers (default: min(4, cores/2))")
    data.add_argument("--max-seq-length", type=int, default=20)
    model = p.add_argument_group("starting point")
    model.add_argument(
        "--load",
        help="checkpoint whose encoder is loaded: HF folder, our pre-training output, "
        "model_LXRT.pth, or a fine-tuned model of this task (its head is loaded too)",
    )
    model.add_argument("--load-lxmert-qa", help="pre-training checkpoint: encoder + answer head through the table")
    model.add_argument("--from-scratch", action="store_true", help="random initialisation from --model-config")
    model.add_argument("--model-config", default="lxmert_small", help="config for --from-scratch (file or preset)")
    model.add_argument(
        "--sample-pretrain-dir",
        default=os.path.join("output", "sample_pretrain"),
        help="sample mode: the sample pre-trained model, pre-trained here first if absent",
    )
    model.add_argument("--sample-pretrain-steps", type=int, default=150)
    sched = p.add_argument_group("schedule (defaults: the original's for the task)")
    sched.add_argument("--epochs", type=int, default=None, help="0: evaluate (and --test) only")
    sched.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    sched.add_argument("--lr", type=float, default=None)
    sched.add_argument("--warmup", type=float, default=None, help="warm-up fraction of the total steps")
    sched.add_argument("--optimizer", choices=("bertadam", "adamw"), default="bertadam")
    sched.add_argument("--weight-decay", type=float, default=0.01)
    sched.add_argument("--loss", choices=("bce", "ce"), default="bce", help="VQA / GQA loss (NLVR2: always CE)")
    sched.add_argument("--seed", type=int, default=9595)
    run = p.add_argument_group("output")
    run.add_argument("--output-dir", help="default: output/finetune_TASK")
    run.add_argument("--test", action="store_true", help="predict --test-json and write the submission file")
    run.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: epoch ends only)")
    run.add_argument("--keep-checkpoints", type=int, default=2)
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest")
    run.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    training.add_engine_arguments(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = training.parse_args_with_config(parser, argv)
    spec = TASKS[args.task]
    args.epochs = spec.epochs if args.epochs is None else args.epochs
    args.lr = spec.lr if args.lr is None else args.lr
    args.warmup = spec.warmup if args.warmup is None else args.warmup
    args.output_dir = args.output_dir or os.path.join("output", f"finetune_{args.task}")
    if args.deepspeed_config is None:
        args.deepspeed_config = DEFAULT_DS_CONFIG
    elif not os.path.isfile(args.deepspeed_config) and os.path.isfile(os.path.join(REPO_ROOT, args.deepspeed_config)):
        args.deepspeed_config = os.path.join(REPO_ROOT, args.deepspeed_config)
    if sum(bool(x) for x in (args.load, args.load_lxmert_qa, args.from_scratch)) > 1:
        parser.error("give at most one of --load, --load-lxmert-qa, --from-scratch")
    return args


def _split(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [v for v in value.split(",") if v]


# -------------------------------------------------------------------------------------------------- sample mode
def use_sample_data(args):
    """No --train: point every data flag at the task's sample data, and (unless a starting point is given) at the
    sample pre-trained model: --load-lxmert-qa for VQA / GQA, --load for NLVR2."""
    from lxmert_fast.data import ensure_sample_data
    from lxmert_fast.data.finetune_sample import ensure_finetune_sample

    if training.is_main():  # rank 0 generates; the others wait, then find it complete
        ensure_finetune_sample(ensure_sample_data(args.sample_data_dir))
    training.barrier()
    sample = ensure_sample_data(args.sample_data_dir)
    paths = ensure_finetune_sample(sample)
    args.train = str(paths.split(args.task, "train"))
    args.valid = args.valid or str(paths.split(args.task, "valid"))
    args.test_json = args.test_json or str(paths.split(args.task, "test"))
    args.features = args.features or str(paths.features_tsv)
    args.tokenizer = args.tokenizer or str(paths.tokenizer_dir)
    args.answer_table = args.answer_table or str(paths.answer_table)
    if TASKS[args.task].is_qa:
        args.ans2label = args.ans2label or str(paths.ans2label(args.task))
    if not (args.load or args.load_lxmert_qa or args.from_scratch):
        model_dir = ensure_sample_pretrained(args)
        if TASKS[args.task].is_qa:
            args.load_lxmert_qa = model_dir
        else:
            args.load = model_dir


def ensure_sample_pretrained(args):
    """The sample pre-trained model, made by a short pre-training run on the sample data if it is not there.

    The run is a child process on rank 0 (a world of one: the launcher's rank variables are removed): pretrain.main
    tears its process group down when it finishes, after which DeepSpeed cannot build a second engine in the same
    process."""
    final = os.path.join(args.sample_pretrain_dir, "final_model")
    if training.is_main() and not all(
        os.path.isfile(os.path.join(final, f)) for f in ("config.json", "model.safetensors")
    ):
        training.print0(
            f"No sample pre-trained model in {final}: pre-training one for "
            f"{args.sample_pretrain_steps} steps on the sample data first."
        )
        launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in launcher}
        command = [
            sys.executable,
            os.path.join(REPO_ROOT, "lxmert_fast", "pretrain.py"),
            "--output-dir",
            args.sample_pretrain_dir,
            "--sample-data-dir",
            args.sample_data_dir,
            "--max-steps",
            str(args.sample_pretrain_steps),
            "--epochs",
            "100",
        ]
        subprocess.run(command, env=env, check=True)
    training.barrier()
    return final


# -------------------------------------------------------------------------------------------------------- data
def build_data(args):
    """(train, valid, test) datasets (None where not asked for) and the answer vocabulary (None for NLVR2)."""
    from lxmert_fast.data import FeatureStore

    if not args.features:
        raise SystemExit("--features is required with --train / --valid / --test-json")
    stores = [FeatureStore.from_tsv(path) for path in _split(args.features)]
    tokenizer = args.tokenizer or "bert-base-uncased"
    vocab = None
    if TASKS[args.task].is_qa:
        if not args.ans2label:
            raise SystemExit(f"--task {args.task} needs --ans2label (trainval_ans2label.json)")
        vocab = AnswerVocab.load(args.ans2label, args.label2ans)

    def dataset(files, require_labels=True):
        if not files:
            return None
        # features travel as stored (float16, half the bytes); training.to_device casts them to the model's dtype
        if vocab is None:
            return NLVR2Dataset(files, stores, tokenizer, args.max_seq_length, require_labels, "float16")
        return QADataset(files, stores, vocab, tokenizer, args.task, args.max_seq_length, require_labels, "float16")

    train = dataset(_split(args.train)) if args.epochs > 0 else None
    valid = dataset(_split(args.valid))
    test = dataset(_split(args.test_json), require_labels=False) if args.test else None
    if args.test and test is None:
        raise SystemExit("--test needs --test-json (the split to predict)")
    return train, valid, test, vocab


# ------------------------------------------------------------------------------------------------- evaluation
def predict_dataset(engine, dataset, task, label2ans, micro, dtype, num_workers):
    """{id: prediction} over the whole dataset, the work split over ranks and gathered on every rank."""
    world, rank = training.world_size(), training.rank()
    n = len(dataset)
    padded = list(range(n)) + list(range(-n % world))  # every rank runs as many batches (ZeRO-3 needs that)
    mine = padded[rank::world]
    batches = [mine[i : i + micro] for i in range(0, len(mine), micro)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=finetune_collate, num_workers=num_workers
    )
    predictions = {}
    text_stats = dataset.text_length_stats()
    engine.eval()
    with torch.no_grad():
        for batch in loader:
            index = batch.pop("index").tolist()
            batch["text_token_capacity"] = text_token_capacity(batch["attention_mask"], *text_stats)
            out = engine(training.to_device(batch, engine.device, dtype))
            for i, p in zip(index, predict(task, out["logits"], label2ans), strict=True):
                predictions[dataset.qid(i)] = p
    engine.train()
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, predictions)
        predictions = {k: v for part in gathered for k, v in part.items()}
    return {dataset.qid(i): predictions[dataset.qid(i)] for i in range(n)}  # in file order


def save_task_model(model, out_dir, label2ans):
    """config.json + model.safetensors (fp32) + label2ans.json, on rank 0 (gathering ZeRO-3 shards first)."""

    def save():
        copy = type(model)(model.config, backend="torch")
        copy.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
        copy.save_pretrained(out_dir)
        if label2ans is not None:
            with open(os.path.join(out_dir, LABEL2ANS_FILE), "w") as f:
                json.dump(list(label2ans), f)

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if params:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if training.is_main():
                save()
    elif training.is_main():
        save()
    training.barrier()


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None):
    """Fine-tune and / or evaluate; returns {"valid": metrics, "best_score", "test": metrics, "submission"}."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    rank, world, ds_config, precision, micro, accum, ckpt_dir = training.start_run(args)
    num_workers = args.num_workers if args.num_workers is not None else min(4, (os.cpu_count() or 2) // 2)

    if args.train is None and args.valid is None and args.test_json is None:
        use_sample_data(args)
    if training.is_main():  # rank 0 converts the feature TSVs; the others wait and map the stores
        train_set, valid_set, test_set, vocab = build_data(args)
    training.barrier()
    if not training.is_main():
        train_set, valid_set, test_set, vocab = build_data(args)
    label2ans = vocab.label2ans if vocab is not None else None
    # printed beside each validation score: a model that does no better than this does not use the image
    records = [d.records if d is not None else None for d in (train_set, valid_set)]
    baseline = question_only_note(args.task, *records, label2ans)

    any_set = next(d for d in (train_set, valid_set, test_set) if d is not None)
    scratch_config = None
    if args.from_scratch or not (args.load or args.load_lxmert_qa):
        scratch_config = resolve_model_config(args.model_config)
        scratch_config.vocab_size, scratch_config.visual_feat_dim = len(any_set.tokenizer), any_set.feat_dim
    plan = training.plan_engine(args, precision, world, accum)
    torch.manual_seed(args.seed)  # the same random head on every rank
    model = build_task_model(
        args.task,
        load=args.load,
        load_qa=args.load_lxmert_qa,
        answer_table=args.answer_table,
        label2ans=label2ans,
        config=scratch_config,
        backend=plan.model_backend,
        log=training.print0,
    )
    if len(any_set.tokenizer) > model.config.vocab_size:
        raise SystemExit(
            f"the tokenizer has {len(any_set.tokenizer)} tokens but the model's vocabulary only "
            f"{model.config.vocab_size}: use the tokenizer the checkpoint was pre-trained with"
        )
    if any_set.feat_dim != model.config.visual_feat_dim:
        raise SystemExit(
            f"features have {any_set.feat_dim} dimensions, the model expects {model.config.visual_feat_dim}"
        )

    steps_per_epoch = total_steps = 0
    if train_set is not None:
        micro_per_epoch = training.num_micro_batches(len(train_set), micro, world) // accum * accum
        steps_per_epoch = micro_per_epoch // accum
        if steps_per_epoch == 0:
            raise SystemExit(f"{len(train_set)} training samples are fewer than one batch ({micro * world * accum})")
        total_steps = args.epochs * steps_per_epoch
        if args.max_steps is not None and args.max_steps > 0:
            total_steps = min(total_steps, args.max_steps)
    objective = FinetuneObjective(model, args.task, args.loss)
    optimizer = build_optimizer(objective.parameters(), args.optimizer, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, max(total_steps, 1), args.warmup)
    engine, dtype = training.build_engine(plan, objective, optimizer, scheduler, ds_config)
    training.print0(
        f"LXMERT fine-tuning ({args.task}): {model.num_parameters() / 1e6:.1f}M parameters, "
        f"{len(train_set) if train_set else 0} train / {len(valid_set) if valid_set else 0} valid samples"
        f"{f', {len(label2ans)} answers' if label2ans else ''}, {world} rank(s) on {engine.device}, {plan.precision}, "
        f"{plan.describe(engine)}, "
        f"batch {micro * accum * world}, {steps_per_epoch} steps/epoch, {total_steps} steps, lr {args.lr}"
    )

    step, epoch, pos, micro_step, best = 0, 0, 0, 0, None
    if args.resume:
        tag, state = training.load_checkpoint(engine, ckpt_dir)
        if tag is not None:
            step, epoch, pos, micro_step, best = (state[k] for k in ("step", "epoch", "pos", "micro_step", "best"))
            training.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
            training.print0(f"resumed from {os.path.join(ckpt_dir, tag)}: step {step}, epoch {epoch}")
            if training.is_main():
                training.truncate_metrics(os.path.join(args.output_dir, "metrics.jsonl"), step)
    metrics = training.MetricsLogger(args.output_dir, enabled=training.is_main())
    result = {"valid": None, "best_score": best, "test": None, "submission": None}

    def run_eval(dataset, split):
        t0 = time.perf_counter()
        preds = predict_dataset(engine, dataset, args.task, label2ans, micro, dtype, num_workers)
        scores = evaluate(args.task, preds, dataset.labels) if dataset.labels else {}
        record = {"step": step, "epoch": epoch, "split": split, **scores, "eval_time_s": time.perf_counter() - t0}
        metrics.log(record)
        if scores:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            training.print0(f"{split} after step {step}: {shown}{baseline if split == 'valid' else ''}")
        return preds, scores

    def checkpoint():
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, training.rng_state())
        state = {"step": step, "epoch": epoch, "pos": pos, "micro_step": micro_step, "best": best, "rng": rngs}
        training.save_checkpoint(engine, ckpt_dir, step, state, keep=args.keep_checkpoints)

    def check_losses(losses):
        """The loss averaged over ranks; a NaN or inf stops the run before the weights are updated."""
        values, bad = training.reduce_losses({"loss": losses["loss"]}, engine.device)
        if bad:
            raise training.NonFiniteLossError(
                f"non-finite loss at step {step + 1} (epoch {epoch}, micro-batch {pos}); weights were not updated"
            )
        return values

    text_stats = train_set.text_length_stats() if train_set is not None else None
    bar = training.progress_bar(total_steps, initial=step, desc=f"finetune {args.task}")
    timer = training.Timer()
    loss_sum, count = 0.0, 0
    try:
        while step < total_steps:
            batches = training.epoch_batches(len(train_set), micro, args.seed, epoch, rank, world, start=pos)
            batches = batches[: micro_per_epoch - pos]
            loader = torch.utils.data.DataLoader(
                train_set,
                batch_sampler=batches,
                collate_fn=finetune_collate,
                num_workers=num_workers,
                pin_memory=torch.cuda.is_available(),
            )
            for batch in loader:
                training.seed_step(args.seed, micro_step, rank)
                batch.pop("index")
                # under --compile and CUDA graphs the token-wise layers then skip most of the question padding
                batch["text_token_capacity"] = text_token_capacity(batch["attention_mask"], *text_stats)
                lr = scheduler.get_last_lr()[0]
                values = training.train_micro_batch(
                    engine, training.to_device(batch, engine.device, dtype), check_losses
                )
                micro_step, pos = micro_step + 1, pos + 1
                timer.add(micro * world)
                loss_sum, count = loss_sum + values["loss"], count + 1
                if micro_step % accum:
                    continue
                step += 1
                bar.update(1)
                if step % args.log_every == 0 or step == total_steps:
                    metrics.log(
                        {
                            "step": step,
                            "epoch": epoch,
                            "lr": lr,
                            "loss": loss_sum / count,
                            "samples_per_s": timer.rate(),
                            **training.graph_counters(engine),
                        }
                    )
                    bar.set_postfix(loss=f"{loss_sum / count:.3f}")
                    loss_sum, count = 0.0, 0
                if args.save_every and step % args.save_every == 0 and pos < micro_per_epoch:
                    checkpoint()
                if step >= total_steps:
                    break
            if pos >= micro_per_epoch:
                epoch, pos = epoch + 1, 0
            if valid_set is not None:  # the original evaluates after every epoch and keeps the best model
                _, scores = run_eval(valid_set, "valid")
                result["valid"] = scores
                if best is None or scores["eval_score"] > best:
                    best = scores["eval_score"]
                    save_task_model(model, os.path.join(args.output_dir, "best_model"), label2ans)
            checkpoint()
    finally:
        bar.close()

    if total_steps == 0 and valid_set is not None:  # evaluation only
        result["valid"] = run_eval(valid_set, "valid")[1]
    if total_steps > 0:
        save_task_model(model, os.path.join(args.output_dir, "final_model"), label2ans)
    if test_set is not None:
        preds, scores = run_eval(test_set, "test")
        result["test"] = scores or None
        if training.is_main():
            result["submission"] = str(
                write_submission(args.task, preds, os.path.join(args.output_dir, SUBMISSION_NAME[args.task]))
            )
            training.print0(f"submission written to {result['submission']}")
    result["best_score"] = best
    total_time = time.perf_counter() - t_start
    metrics.log({"event": "end", "step": step, "total_time_s": total_time, "best_eval_score": best})
    metrics.close()
    training.print0(f"done: {step} steps in {total_time:.1f} s; best eval_score {best}; output in {args.output_dir}")
    training.barrier()
    return result


if __name__ == "__main__":
    try:
        main()
    except training.NonFiniteLossError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
