"""Pre-training as a library: the command line, the resolved run, the data, the model and the loop.

lxmert_fast/pretrain.py is the command.
"""

import os
from dataclasses import dataclass

from lxmert_fast.cli import plural
from lxmert_fast.model.checks import check_model_fields
from lxmert_fast.train import run_config

TASKS = ("mlm", "matched", "obj", "attr", "feat", "qa")
TASK_NAMES = {"mlm": "masked language model", "matched": "cross-modality matching",
              "obj": "object-label classification", "attr": "attribute classification",
              "feat": "RoI-feature regression", "qa": "image question answering"}


@dataclass(frozen=True)
class PretrainData:
    """The data flags (comma-separated paths), the sample data's filled in when no --train-json is given."""

    train_json: str | None = None
    valid_json: str | None = None
    valid_batches: int = 50
    valid_maskings: int = 1
    features: str | None = None
    answer_table: str | None = None
    tokenizer: str | None = None
    sample_data_dir: str = "sample_data"
    strict: bool = False


@dataclass(frozen=True)
class PretrainTasks:
    tasks: tuple[str, ...] = TASKS
    qa_from_epoch: int = 0
    model_config: str = "lxmert_small"
    loss_groups: int = 4  # the masked-LM and QA losses: the mean over this many groups of the global batch


def build_parser():
    p = run_config.make_parser("LXMERT pre-training (DeepSpeed, or one device with --engine torch).")
    data = p.add_argument_group("data (default: the generated sample data set)")
    data.add_argument("--train-json", help="comma-separated pre-training JSON files (sentf/labelf records)")
    data.add_argument("--valid-json", help="comma-separated JSON files for a validation loss after each epoch")
    data.add_argument("--valid-batches", type=int, default=50, help="validation micro-batches per rank (0: none)")
    data.add_argument("--valid-maskings", type=int, default=1, metavar="N",
                      help="validate on N maskings of the validation set (epochs 0..N-1's draws): more masked words "
                      "for a small set")
    data.add_argument("--features", help="comma-separated object-feature TSV files (converted once to a store)")
    data.add_argument("--answer-table", help="all_ans.json")
    data.add_argument("--tokenizer", help="tokenizer folder or hub name (default: the sample data's vocabulary)")
    data.add_argument("--sample-data-dir", default="sample_data", help="where sample data is generated if needed")
    data.add_argument("--strict", action="store_true", help="refuse annotation records whose image has no features")
    model = p.add_argument_group("model and tasks")
    model.add_argument("--model-config", default="lxmert_small",
                       help="config.json of LxmertConfig fields, or a preset in configs/ (lxmert_small, lxmert_base)")
    model.add_argument("--qa-from-epoch", type=int, default=0,
                       help="first epoch (0-based) with the QA loss; the paper: 10 of 20, the released code: 0")
    model.add_argument("--loss-groups", type=loss_groups, default=4, metavar="N",
                       help="the masked-LM and QA losses are the mean over N equal groups of each global batch, "
                       "whatever the number of ranks (the paper: 4, its 4 GPUs); 0 or 'ranks': each rank's own "
                       "mean, then the mean over ranks (the original's DataParallel behaviour on your rank count)")
    for task in TASKS:
        model.add_argument(f"--no-{task}", action="store_true", help=f"switch off the {TASK_NAMES[task]} task")
    run_config.add_training_arguments(p, output_dir=os.path.join("output", "pretrain"), save_every=200)
    p.set_defaults(epochs=1, lr=1e-4, warmup=0.05)
    return p


def loss_groups(text):
    return 0 if text == "ranks" else int(text)


def resolve(argv=None):
    """The run's RunConfig: flags, the sample data's paths when no --train-json is given, the model preset."""
    parser = build_parser()
    flags, _ = run_config.parse_args_with_config(parser, argv)
    flags["tasks"] = tuple(t for t in TASKS if not flags[f"no_{t}"])
    if not flags["tasks"]:
        parser.error("every task is switched off")
    if flags["valid_maskings"] < 1:
        parser.error(f"--valid-maskings {flags['valid_maskings']}: give 1 or more")
    if flags["train_json"] is None:
        from lxmert_fast.data import ensure_sample_data

        sample = ensure_sample_data(flags["sample_data_dir"])  # safe when every rank calls it
        flags.update(train_json=str(sample.train_json), valid_json=flags["valid_json"] or str(sample.valid_json),
                     features=flags["features"] or str(sample.features_tsv),
                     answer_table=flags["answer_table"] or str(sample.answer_table),
                     tokenizer=flags["tokenizer"] or str(sample.tokenizer_dir))
    missing = [f"--{f.replace('_', '-')}" for f in ("features", "answer_table", "tokenizer") if flags[f] is None]
    if missing:
        parser.error(f"--train-json given without {', '.join(missing)}")
    run_config.check_files(flags, ("train_json", "valid_json", "features", "answer_table"))
    model_file = run_config.find_config(flags["model_config"])
    model = run_config.read_json(model_file, "a model config (LxmertConfig fields)")
    check_model_fields(model, model_file)
    config = run_config.resolve("pretrain", flags, default_deepspeed="ds_zero2_fp16.json",
                                model=model_with_tasks(model, flags["tasks"]),
                                data=run_config.section(PretrainData, flags),
                                task=run_config.section(PretrainTasks, flags))
    from lxmert_fast.train.objectives import check_loss_groups

    engine = config.engine
    check_loss_groups(config.task.loss_groups, engine.micro_batch, engine.accumulation, engine.world_size)
    return config


def _rounded(loss) -> str:
    """A loss for the final message, to 2 decimals ("none" before any step)."""
    return "none" if loss is None else f"{loss:.2f}"


def model_with_tasks(fields, tasks):
    """The model config's fields with the heads of exactly the enabled tasks."""
    return {**fields, "task_mask_lm": "mlm" in tasks, "task_matched": "matched" in tasks,
            "visual_obj_loss": "obj" in tasks, "visual_attr_loss": "attr" in tasks, "visual_feat_loss": "feat" in tasks,
            "task_obj_predict": any(t in tasks for t in ("obj", "attr", "feat")), "task_qa": "qa" in tasks}


def build_data(config, model_config):
    """(train, valid or None, collate); fills ``model_config``'s vocabulary and answer-table sizes from the data."""
    from lxmert_fast import data as lxdata
    from lxmert_fast.model.checks import check_features

    stores = [lxdata.FeatureStore.from_tsv(path) for path in _split(config.data.features)]  # converted once, mapped
    # features travel as stored (float16, half the bytes); lxmert_fast.data.to_device casts them to the model's dtype
    common = dict(seed=config.run.seed, task_matched="matched" in config.task.tasks, feature_dtype="float16",
                  strict=config.data.strict)
    train = lxdata.PretrainDataset(_split(config.data.train_json), stores, lxdata.AnswerTable(config.data.answer_table),
                                   str(config.data.tokenizer), qa_from_epoch=config.task.qa_from_epoch, **common)
    valid = None
    if config.data.valid_json and config.data.valid_batches > 0:  # QA always on: the validation loss covers every task
        valid = lxdata.PretrainDataset(_split(config.data.valid_json), stores, train.answer_table, train.tokenizer,
                                       **common)
    model_config.vocab_size = train.vocab_size
    model_config.num_qa_labels = len(train.answer_table)
    check_features(stores, model_config, labels=model_config.visual_obj_loss or model_config.visual_attr_loss)
    return train, valid, lxdata.compact_pretrain_collate


def _split(value):
    if value is None:
        return []
    return value if isinstance(value, (list, tuple)) else [v for v in value.split(",") if v]


def pretrain(config):
    """Run the pre-training ``config`` (a resolved RunConfig) describes; returns the final model's folder."""
    from lxmert_fast.train import distributed

    trainer = pretraining_trainer(config)
    trainer.fit()
    final_dir = os.path.join(config.run.output_dir, "final_model")
    trainer.save_model(final_dir)
    total_time = trainer.finish()
    distributed.print0(f"done: {plural(trainer.position.step, 'step')} in {total_time:.1f} s, loss "
                       f"{_rounded(trainer.first_loss)} -> {_rounded(trainer.last_loss)}; model in {final_dir}, "
                       f"metrics in {trainer.metrics.path}")
    return final_dir


def pretraining_trainer(config):
    """The data read and checked, the output folder claimed, the model built: the loop, ready to fit
    (benchmarks/bench_loop.py times the same loop)."""
    import torch

    from lxmert_fast import LxmertConfig, LxmertForPreTraining
    from lxmert_fast.model.static_shapes import StaticShapes
    from lxmert_fast.train import distributed
    from lxmert_fast.train.loop import build_trainer, start
    from lxmert_fast.train.objectives import LossGroups, PretrainingObjective, ValidationLoss, model_saver
    from lxmert_fast.train.pretraining_metrics import count_names, object_word_ids

    # the data is read and checked before start() claims the output folder
    distributed.init_distributed(config.run.process_group_timeout)
    model_config = LxmertConfig(**config.model)
    train_set, valid_set, collate = distributed.main_first(lambda: build_data(config, model_config))
    start(config)
    shapes = StaticShapes.from_statistics(config.engine.micro_batch, train_set.max_seq_length,
                                          *train_set.text_length_stats(), mask_rate=train_set.word_mask_rate)
    torch.manual_seed(config.run.seed)  # the same initial weights on every rank and every run
    model = LxmertForPreTraining(model_config, backend=config.engine.model_backend)
    engine, groups = config.engine, config.task.loss_groups
    groups = LossGroups(groups, engine.micro_batch, engine.accumulation, engine.world_size,
                        distributed.rank()) if groups else None
    # validation accuracies of the words that name the detector's classes (matched pairs; true and rolled images)
    object_ids = object_word_ids(config.data.features, train_set.tokenizer)
    word_groups = {"object": object_ids} if object_ids and model_config.task_mask_lm else {}
    objective = PretrainingObjective(model, shapes, groups, word_groups=word_groups)
    validation = ValidationLoss(train_set, valid_set, collate, config.data.valid_batches, config.data.valid_maskings,
                                count_names(model_config.task_matched, word_groups, model_config.task_mask_lm))
    trainer = build_trainer(config, objective, train_set, collate, name="pretrain",
                            save_model=model_saver(model, train_set.tokenizer), hooks=validation)
    engine = trainer.engine
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 leaves p empty
    distributed.print0(
        f"LXMERT pre-training: {n_params / 1e6:.1f}M parameters, {len(train_set)} samples, {config.engine.world_size} "
        f"rank(s) on {engine.device}, {engine.describe()}, {plural(trainer.total_steps, 'step')}, tasks "
        f"{','.join(config.task.tasks)}, optimizer {config.optimisation.optimizer} lr {config.optimisation.lr}"
    )
    return trainer
