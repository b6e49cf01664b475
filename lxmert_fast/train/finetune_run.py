"""A fine-tuning run (VQA, GQA, NLVR2) from its resolved RunConfig: the data, the task model, the loop, the test.

lxmert_fast/finetune.py is the command that resolves the config.
"""

from __future__ import annotations

import os

import torch

from lxmert_fast.cli import plural
from lxmert_fast.data import FeatureStore
from lxmert_fast.data.finetune_dataset import AnswerVocab, NLVR2Dataset, QADataset, finetune_collate
from lxmert_fast.data.tokenizer import check_tokenizer
from lxmert_fast.model.checks import check_features
from lxmert_fast.model.static_shapes import StaticShapes
from lxmert_fast.tasks.registry import TRUTH_LABELS, get_task
from lxmert_fast.tasks.scoring import question_only_note, write_submission
from lxmert_fast.tasks.task_models import build_task_model
from lxmert_fast.train import distributed
from lxmert_fast.train.loop import build_trainer, start
from lxmert_fast.train.objectives import FinetuneObjective, TaskEvaluation, model_saver


def _split(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [v for v in value.split(",") if v]


def build_data(config):
    """(train, valid, test) datasets (None where not asked for) and the answer vocabulary (None for NLVR2)."""
    stores = [FeatureStore.from_tsv(path) for path in _split(config.data.features)]
    answers = get_task(config.task.name).answers
    vocab = AnswerVocab.load(config.data.ans2label, config.data.label2ans) if answers else None

    def dataset(files, require_labels=True, strict=True):
        if not files:
            return None
        # features travel as stored (float16, half the bytes); data.to_device casts them to the model's dtype
        if vocab is None:
            return NLVR2Dataset(files, stores, config.data.tokenizer, config.data.max_seq_length, require_labels,
                                "float16", strict)
        return QADataset(files, stores, vocab, config.data.tokenizer, config.task.name, config.data.max_seq_length,
                         require_labels, "float16", strict)

    # scores and submissions need every question: only training records may be left out (unless --strict)
    train = dataset(_split(config.data.train), strict=config.data.strict) if config.run.epochs > 0 else None
    valid = dataset(_split(config.data.valid))
    test = dataset(_split(config.data.test_json), require_labels=False) if config.task.test else None
    return train, valid, test, vocab


def build_model(config, any_set, label2ans):
    """The task model from --load / --load-lxmert-qa / the model config, checked against the data."""
    from lxmert_fast import LxmertConfig

    scratch = None
    if config.model is not None:
        scratch = LxmertConfig(**config.model)
        scratch.vocab_size, scratch.visual_feat_dim = len(any_set.tokenizer), any_set.feat_dim
    torch.manual_seed(config.run.seed)  # the same random head on every rank
    model = build_task_model(config.task.name, load=config.task.load, load_qa=config.task.load_lxmert_qa,
                             answer_table=config.data.answer_table, label2ans=label2ans, config=scratch,
                             backend=config.engine.model_backend, log=distributed.print0)
    check_tokenizer(any_set.tokenizer, [], vocab_size=model.config.vocab_size)
    check_features(any_set.stores, model.config, labels=False)
    return model


def finetune(config):
    """Fine-tune and / or evaluate; returns {"valid": metrics, "best_score", "test": metrics, "submission"}."""
    # the data and the model are read and checked before start() claims the output
    distributed.init_distributed(config.run.process_group_timeout)
    train_set, valid_set, test_set, vocab = distributed.main_first(lambda: build_data(config))
    label2ans = vocab.label2ans if vocab is not None else None
    any_set = next(d for d in (train_set, valid_set, test_set) if d is not None)
    model = build_model(config, any_set, label2ans)
    start(config)
    shapes = StaticShapes.from_statistics(config.engine.micro_batch, config.data.max_seq_length,
                                          *any_set.text_length_stats())
    objective = FinetuneObjective(model, config.task.name, config.task.loss, shapes)
    # printed beside each validation score: a model that does no better than this does not use the image
    records = [d.records if d is not None else None for d in (train_set, valid_set)]
    baseline = question_only_note(config.task.name, *records, label2ans)
    check_images = valid_set is not None and config.task.images_shuffled_score
    shuffled = valid_set.with_images_shuffled() if check_images else None
    hooks = TaskEvaluation(config.task.name, valid_set, finetune_collate, label2ans, baseline, shuffled)
    labels = list(label2ans) if label2ans is not None else list(TRUTH_LABELS)
    saver = model_saver(model, any_set.tokenizer, labels)
    trainer = build_trainer(config, objective, train_set, finetune_collate, hooks=hooks, save_model=saver,
                            name=f"finetune {config.task.name}")
    engine = trainer.engine
    distributed.print0(
        f"LXMERT fine-tuning ({config.task.name}): {model.num_parameters() / 1e6:.1f}M parameters, "
        f"{len(train_set) if train_set else 0} train / {len(valid_set) if valid_set else 0} valid samples"
        f"{f', {len(label2ans)} answers' if label2ans else ''}, {config.engine.world_size} rank(s) on {engine.device}, "
        f"{engine.describe()}, {plural(trainer.total_steps, 'step')}, lr {config.optimisation.lr}"
    )
    trainer.fit()
    if trainer.total_steps > 0:
        trainer.save_model(os.path.join(config.run.output_dir, "final_model"))
    result = {"valid": hooks.scores, "best_score": hooks.best, "test": None, "submission": None}
    if test_set is not None:
        result.update(test(trainer, hooks, model, test_set))
    total_time = trainer.finish(best_eval_score=hooks.best)
    best = "none" if hooks.best is None else f"{hooks.best:.4f}"
    distributed.print0(f"done: {plural(trainer.position.step, 'step')} in {total_time:.1f} s; best eval_score {best}; "
                       f"output in {config.run.output_dir}")
    distributed.barrier()
    return result


def test(trainer, hooks, model, test_set):
    """Predict the test split with the best model of the run (the final weights when there is none) and write the
    submission file."""
    config = trainer.config
    best = os.path.join(config.run.output_dir, "best_model")
    if trainer.total_steps > 0 and os.path.isfile(os.path.join(best, "model.safetensors")):
        from safetensors.torch import load_file

        with trainer.engine.whole_parameters(model), torch.no_grad():
            model.load_state_dict(load_file(os.path.join(best, "model.safetensors")))
        distributed.print0(f"--test: predicting with the best model, {best}")
    preds, scores = hooks.run(trainer, test_set, "test")
    submission = None
    if distributed.is_main():
        submission = str(write_submission(config.task.name, preds, os.path.join(config.run.output_dir,
                                                                           get_task(config.task.name).submission_file)))
        distributed.print0(f"submission written to {submission}")
    return {"test": scores or None, "submission": submission}
