"""The fine-tuning tasks, each declared once: everything else (the commands' --task choices, the data readers, the
task models, the metrics and submission files, the predictor) asks this registry instead of listing task names.

    task   model                        head (head_prefix)        logits                      metrics (main first)
    vqa    LxmertForQuestionAnswering   answer_head.logit_fc.     question_answering_score    vqa_score
    gqa    LxmertForQuestionAnswering   answer_head.logit_fc.     question_answering_score    accuracy
    nlvr2  LxmertForNLVR2               logit_fc.                 logits                      accuracy, consistency

VQA and GQA answer from a vocabulary (`answers`: soft-score targets, BCE-with-logits per answer, or CE on the top
answer with --loss ce); NLVR2 says true or false about an image pair (CE on the 0 / 1 label). Plain Python, no
torch: the commands build their --help from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lxmert_fast.tasks.metrics import gqa_accuracy, nlvr2_accuracy, nlvr2_consistency, vqa_score


@dataclass(frozen=True)
class Task:
    """One fine-tuning task; lr, epochs and warmup are the original's defaults (batch size 32 and clipping 5.0
    live in the DeepSpeed JSON)."""

    name: str
    answers: bool  # a classifier over an answer vocabulary (VQA, GQA); False: a true / false pair head (NLVR2)
    model_class_name: str  # in lxmert_fast.model.modeling
    head_prefix: str  # the task head's keys in the model's state dict
    logits_field: str  # the model output holding the task's logits
    metrics: Mapping[str, Callable]  # reported name -> metric(predictions, labels); the first is the main one
    id_field: str  # the record id in annotation files, predictions and submissions
    image_fields: tuple[str, ...]  # the record's image ids: one image, or the NLVR2 pair
    submission_file: str  # the official submission file's name
    submission_keys: tuple[str, str] | None  # a JSON list of {id key: id, answer key: answer}; None: NLVR2's CSV
    lr: float
    epochs: int = 4
    warmup: float = 0.1

    @property
    def main_metric(self) -> str:
        return next(iter(self.metrics))

    @property
    def model_class(self):
        from lxmert_fast.model import modeling

        return getattr(modeling, self.model_class_name)


_QA = dict(answers=True, model_class_name="LxmertForQuestionAnswering", head_prefix="answer_head.logit_fc.",
           logits_field="question_answering_score", id_field="question_id", image_fields=("img_id",))

TASKS = {
    "vqa": Task("vqa", **_QA, metrics={"vqa_score": vqa_score}, submission_file="test_predict.json",
                submission_keys=("question_id", "answer"), lr=5e-5),
    "gqa": Task("gqa", **_QA, metrics={"accuracy": gqa_accuracy}, submission_file="submit_predict.json",
                submission_keys=("questionId", "prediction"), lr=1e-5),
    "nlvr2": Task("nlvr2", answers=False, model_class_name="LxmertForNLVR2", head_prefix="logit_fc.",
                  logits_field="logits", metrics={"accuracy": nlvr2_accuracy, "consistency": nlvr2_consistency},
                  id_field="identifier", image_fields=("img0", "img1"), submission_file="test_predict.csv",
                  submission_keys=None, lr=5e-5),
}
TASK_NAMES = tuple(TASKS)
ANSWER_TASKS = tuple(name for name, task in TASKS.items() if task.answers)
# what an NLVR2 model's two output rows mean (saved as its config's id2label)
TRUTH_LABELS = ("False", "True")


def get_task(name: str) -> Task:
    """The registry's entry of `name`; ValueError naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {TASK_NAMES}")
    return TASKS[name]


__all__ = ["ANSWER_TASKS", "TASKS", "TASK_NAMES", "TRUTH_LABELS", "Task", "get_task"]
