"""What the training loop trains: a model plus its losses, one objective per kind of run.

An objective is the module the engine wraps. ``forward(batch, static=False)`` returns a dict with the total loss
under "loss" (and what else the task reports); ``static=True`` runs the model with the objective's
``static_shapes`` (lxmert_fast.model.static_shapes), which the loop asks for only for a batch that ``fits`` them
(checked on the host). ``prepare(batch)`` turns a collated host batch into the model's inputs.

The task's hooks into the loop (evaluation at an epoch's end, the best model, the checkpoint's client state) live
here too: ``ValidationLoss`` for pre-training, ``TaskEvaluation`` for fine-tuning.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lxmert_fast.data.pretrain_batch import pretrain_inputs
from lxmert_fast.model.folder import save_model_folder
from lxmert_fast.model.static_shapes import StaticShapes
from lxmert_fast.tasks.registry import get_task
from lxmert_fast.train import distributed, metrics, pretraining_metrics
from lxmert_fast.train.loop import Hooks

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos",
                "visual_attention_mask")


class Objective(nn.Module):
    def __init__(self, model, static_shapes: StaticShapes | None = None):
        super().__init__()
        self.model = model
        self.static_shapes = static_shapes

    def fits(self, batch) -> bool:
        return self.static_shapes is not None and self.static_shapes.fits(batch)

    def shapes(self, static):
        return self.static_shapes if static else None


# ------------------------------------------------------------------------------------------------ pre-training
class LossGroups:
    """The masked-LM and QA losses as a property of the recipe, not of the rank count: the mean over ``groups``
    equal groups of each optimiser step's global batch, each group's loss the mean over its labelled tokens
    (questions); the paper's 4 groups of 64 are its 4 GPUs' DataParallel replicas.

    A micro-step's ``micro * world`` samples (sampling.epoch_batches: row j of rank r is sample j * world + r of
    it) hold ``groups / accumulation`` consecutive groups. Each rank weights its labelled tokens by
    ``world * accumulation / groups / count(group)``, the counts summed over the ranks; DeepSpeed averages the
    gradients over ranks and accumulation steps, which makes them those of the mean over the groups. Each rank's
    reported loss, averaged over the ranks, is the mean over the micro-step's groups."""

    def __init__(self, groups, micro_batch, accumulation, world, rank, reduce=None):
        chunk, per_step = micro_batch * world, groups // accumulation
        self.group_size, self.per_step = chunk // per_step, per_step
        self.scale, self.world, self.rank = world / per_step, world, rank
        self.reduce = reduce or self._all_reduce

    def row_groups(self, rows, device):
        return (torch.arange(rows, device=device) * self.world + self.rank) // self.group_size  # (B,)

    def local_counts(self, batch):
        """(groups of this micro-step, 2): labelled tokens and labelled questions of this rank's rows per group."""
        labels, ans = batch["labels"], batch["ans"]
        per_row = torch.stack([(labels != -100).sum(1), (ans != -100).long()], dim=1)  # (B, 2)
        counts = torch.zeros(self.per_step, 2, dtype=torch.long, device=labels.device)
        return counts.index_add_(0, self.row_groups(labels.shape[0], labels.device), per_row)

    @torch.compiler.disable
    def weights(self, batch):
        """{"mlm": (B, T), "qa": (B,)}: each row's weight for the model's ``label_weights``."""
        counts = self.reduce(self.local_counts(batch)).clamp(min=1).float()  # (groups, 2)
        per_row = self.scale / counts[self.row_groups(batch["labels"].shape[0], counts.device)]  # (B, 2)
        return {"mlm": per_row[:, :1].expand_as(batch["labels"]), "qa": per_row[:, 1]}

    @staticmethod
    def _all_reduce(counts):
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(counts)
        return counts


def check_loss_groups(groups, micro_batch, accumulation, world, flag="--loss-groups"):
    """``groups`` equal groups of the global batch, each within one micro-step; a ConfigError otherwise."""
    from lxmert_fast.errors import ConfigError

    chunk = micro_batch * world
    if groups < 0 or (groups and (groups % accumulation or chunk % (groups // accumulation))):
        raise ConfigError(
            f"{flag} {groups}: the global batch of {micro_batch} x {accumulation} accumulation step(s) x {world} "
            f"rank(s) does not split into {groups} equal groups each within one micro-step ({chunk} samples); give "
            f"a multiple of {accumulation} that divides {chunk * accumulation}, or {flag} 0 (each rank's own mean)"
        )


def pretraining_losses(model, batch, static_shapes=None, label_weights=None):
    """The pre-training losses of ``model`` (an LxmertForPreTraining) on a collated batch: ``loss`` (the total)
    and ``{task}_loss`` for each task the model's config switches on.

    The model computes them as transformers does (the total equals transformers' loss on the same batch), with the
    language-model head evaluated only at masked tokens, cross-entropies in fp32, and 0 instead of NaN for a task
    with no label in the batch (a small batch, or QA before --qa-from-epoch).
    """
    out = model(**batch, return_task_losses=True, lm_logits_at_labels_only=True, static_shapes=static_shapes,
                label_weights=label_weights)
    losses = {f"{task}_loss": value for task, value in out.task_losses.items()}
    losses["loss"] = out.loss
    return losses


class PretrainingObjective(Objective):
    """LxmertForPreTraining and its five tasks' losses; in training, normalised over ``loss_groups`` (a LossGroups)
    when given, else over each rank's micro-batch. In evaluation, with ``word_groups`` ({name: token ids}), also
    the validation accuracies' counts under "counts" (lxmert_fast.train.pretraining_metrics)."""

    def __init__(self, model, static_shapes: StaticShapes | None = None, loss_groups: LossGroups | None = None,
                 word_groups: dict | None = None):
        super().__init__(model, static_shapes)
        self.loss_groups, self.word_groups = loss_groups, word_groups

    def prepare(self, batch):
        return pretrain_inputs(batch, next(self.parameters()).device)

    def forward(self, batch, static=False):
        grouped = self.loss_groups is not None and self.training and "labels" in batch and "ans" in batch
        weights = self.loss_groups.weights(batch) if grouped else None
        out = pretraining_losses(self.model, batch, self.shapes(static), weights)
        if not self.training and self.word_groups is not None:
            out["counts"] = self.counts(batch)
        return out

    @torch.compiler.disable
    def counts(self, batch):
        return pretraining_metrics.pretraining_counts(self.model, batch, self.word_groups)


class ValidationLoss(Hooks):
    """Pre-training's hooks: the epoch's masking, and at each epoch's end the mean losses over the validation set
    (no dropout; the maskings of epochs 0 .. ``maskings`` - 1, the same at every evaluation), at most ``batches``
    micro-batches per rank and masking; with ``count_names`` (pretraining_metrics.count_names) also the accuracies
    the objective counts, logged as ``valid_{name}_acc``."""

    def __init__(self, train_set, valid_set, collate, batches, maskings=1, count_names=()):
        self.train_set, self.valid_set, self.collate, self.batches = train_set, valid_set, collate, batches
        self.maskings, self.count_names = maskings, list(count_names)

    def on_epoch_start(self, trainer):
        self.train_set.set_epoch(trainer.position.epoch)

    def on_epoch_end(self, trainer):
        if self.valid_set is None:
            return
        sums, count, counts = {}, 0, {}
        for masking in range(self.maskings):
            self.valid_set.set_epoch(masking)
            for _, out in trainer.evaluate(self.valid_set, self.collate, limit=self.batches,
                                           seed=trainer.config.run.seed):
                pretraining_metrics.add_counts(counts, out.pop("counts", {}))
                values, _ = metrics.reduce_losses(out, trainer.engine.device)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        if not count:
            return
        record = {f"valid_{k}": v / count for k, v in sorted(sums.items())}
        accuracy = pretraining_metrics.accuracies(
            pretraining_metrics.summed_counts(counts, self.count_names, trainer.engine.device))
        record.update({f"valid_{k}_acc": v for k, v in accuracy.items()})
        p = trainer.position
        trainer.log({"event": "eval", "split": "valid", "step": p.step, "epoch": p.epoch, **record})
        distributed.print0(f"validation at step {p.step}: loss {record['valid_loss']:.4f}{describe(accuracy)}")


def describe(accuracy: dict) -> str:
    """The validation accuracies for the console: ", matching 0.74, masked words 0.52, object words 0.61 (0.23
    with the images shuffled)"."""
    text = [f"matching {accuracy['matched']:.3f}"] if "matched" in accuracy else []
    text += [f"masked words {accuracy['mlm']:.3f}"] if "mlm" in accuracy else []
    for name, value in accuracy.items():
        if f"{name}_images_shuffled" in accuracy:
            text.append(f"{name} words {value:.3f} ({accuracy[name + '_images_shuffled']:.3f} with the images "
                        "shuffled)")
    return "".join(f", {t}" for t in text)


# ------------------------------------------------------------------------------------------------- fine-tuning
def task_loss(task: str, logits: torch.Tensor, batch: dict, loss: str = "bce") -> torch.Tensor:
    """VQA / GQA: BCE-with-logits on the soft scores, mean over all entries x number of answers (the original's
    scaling: a sum over answers, mean over the batch); `loss="ce"`: cross-entropy on each question's top answer
    (questions with no known answer ignored). NLVR2: cross-entropy on the 0 / 1 label."""
    logits = logits.float()  # (B, A) or (B, 2)
    if not get_task(task).answers:  # NLVR2
        return F.cross_entropy(logits, batch["label"], ignore_index=-100)
    target = batch["target"].float()  # (B, A)
    if loss == "ce":
        best, label = target.max(dim=1)
        label = torch.where(best > 0, label, torch.full_like(label, -100))
        return F.cross_entropy(logits, label, ignore_index=-100)
    return F.binary_cross_entropy_with_logits(logits, target) * logits.shape[1]


class FinetuneObjective(Objective):
    """A task model plus its loss: ``forward(batch)`` -> {"logits", and "loss" when the batch carries targets}."""

    def __init__(self, model, task: str, loss: str = "bce", static_shapes: StaticShapes | None = None):
        super().__init__(model, static_shapes)
        self.task, self.loss = task, loss

    def prepare(self, batch):
        return {k: v for k, v in batch.items() if k != "index"}

    def forward(self, batch, static=False):
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        out = self.model(**inputs, static_shapes=self.shapes(static), return_dict=True)
        logits = getattr(out, get_task(self.task).logits_field)  # (B, 2) / (B, A)
        result = {"logits": logits}
        if "target" in batch or "label" in batch:
            result["loss"] = task_loss(self.task, logits, batch, self.loss)
        return result


class TaskEvaluation(Hooks):
    """Fine-tuning's hooks: after each epoch, the task's scores on the validation set (metrics.jsonl gets
    ``eval_score``, the main metric), and the best model so far in OUTPUT_DIR/best_model; the best score goes into
    each checkpoint."""

    def __init__(self, task, valid_set, collate, label2ans=None, baseline="", shuffled_set=None):
        self.task, self.valid_set, self.collate, self.label2ans = task, valid_set, collate, label2ans
        self.baseline = baseline  # printed beside each validation score (evaluation.question_only_note)
        # the validation set with other images (its with_images_shuffled()): scored too, and printed beside
        self.shuffled_set = shuffled_set
        self.best, self.scores = None, None

    def client_state(self):
        return {"best": self.best}

    def load_client_state(self, state):
        self.best = state.get("best")

    def predict(self, trainer, dataset):
        """{id: prediction} over the whole dataset, the work split over ranks and gathered on every rank."""
        from lxmert_fast.tasks.task_models import predict

        predictions = {}
        for host_batch, out in trainer.evaluate(dataset, self.collate):
            answers = predict(self.task, out["logits"], self.label2ans)
            for i, answer in zip(host_batch["index"].tolist(), answers, strict=True):
                predictions[dataset.qid(i)] = answer
        if trainer.config.engine.world_size > 1:
            gathered = [None] * trainer.config.engine.world_size
            torch.distributed.all_gather_object(gathered, predictions)
            predictions = {k: v for part in gathered for k, v in part.items()}
        return {dataset.qid(i): predictions[dataset.qid(i)] for i in range(len(dataset))}  # in file order

    def run(self, trainer, dataset, split, note="", show=True):
        """Predict and score ``dataset``, log the scores as an ``eval`` record of ``split``, print them (with
        ``note``) unless not ``show``; returns (predictions, scores)."""
        from lxmert_fast.tasks.scoring import evaluate

        t0 = time.perf_counter()
        preds = self.predict(trainer, dataset)
        scores = evaluate(self.task, preds, dataset.labels) if dataset.labels else {}
        p = trainer.position
        trainer.log({"event": "eval", "split": split, "step": p.step, "epoch": p.epoch, **scores,
                     "eval_time_s": time.perf_counter() - t0})
        if scores and show:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            distributed.print0(f"{split} after step {p.step}: {shown}{note}")
        return preds, scores

    def on_epoch_end(self, trainer):
        if self.valid_set is None:
            return
        note = self.baseline
        if self.shuffled_set is not None:
            _, shuffled = self.run(trainer, self.shuffled_set, "valid_images_shuffled", show=False)
            note += f" (images shuffled between questions: {shuffled['eval_score']:.4f})"
        _, self.scores = self.run(trainer, self.valid_set, "valid", note)
        if trainer.total_steps and (self.best is None or self.scores["eval_score"] > self.best):
            self.best = self.scores["eval_score"]
            trainer.save_model(os.path.join(trainer.config.run.output_dir, "best_model"))


def model_saver(model, tokenizer, labels=None):
    """``save(folder, weights=True)``: ``model`` as a self-contained folder (lxmert_fast.model.folder)."""

    def save(folder, weights=True):
        save_model_folder(model, folder, tokenizer, labels, weights=weights)

    return save
