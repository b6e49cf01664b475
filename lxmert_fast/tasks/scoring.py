"""Fine-tuning metrics and the official submission files of VQA v2, GQA and NLVR2.

Metrics: each task's, as the registry (lxmert_fast.tasks.registry) names them (lxmert_fast.tasks.metrics):
    evaluate(task, predictions, labels) -> {"eval_score": main metric, ...}

Submission files (written atomically; the registry's submission_keys and submission_file):
    VQA    JSON [{"question_id": ..., "answer": "..."}]
    GQA    JSON [{"questionId": ..., "prediction": "..."}]
    NLVR2  CSV lines "identifier,True|False", no header, as the original's dump_result
    write_submission(task, predictions, path); read_submission(task, path) -> the predictions dict back

The question-only baseline, to tell whether a model looks at the image at all:
    question_only_score(task, train_records, eval_records, answers=None) -> (score, "question" | "question type")
    question_only_note(...) -> the text finetune.py prints beside each validation score
        the best score of always giving, per question text (or per VQA question type), the answer that training
        gave it most (by summed soft score; NLVR2: the majority label per statement), backing off to the type and
        then to the most frequent answer overall for questions never seen in training
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from lxmert_fast.files import write_text
from lxmert_fast.tasks.registry import get_task


def evaluate(task: str, predictions: Mapping, labels: Mapping) -> dict[str, float]:
    """The task's metrics; `eval_score` is its main one (VQA score, GQA accuracy, NLVR2 accuracy)."""
    spec = get_task(task)
    metrics = {name: metric(predictions, labels) for name, metric in spec.metrics.items()}
    return {"eval_score": metrics[spec.main_metric], **metrics}


# ---------------------------------------------------------------------------------------------------------------
# Question-only baseline

_QUESTION_ONLY_KEYS = {
    "question": lambda r: (r.get("question_type"), r["sent"].strip().lower()),  # unseen text: back off to the type
    "question type": lambda r: (r.get("question_type"),),
}


def _question_only_predictions(task: str, train_records, eval_records, key, answers=None) -> dict:
    """{id: the training answer with the highest summed score among training questions sharing the longest prefix
    of `key`} (NLVR2: label counts per statement); answers outside `answers` (the model's vocabulary) never win."""
    spec = get_task(task)
    allowed = None if answers is None else set(answers)
    totals: dict[tuple, dict] = {}
    for record in train_records:
        targets = record["label"] if spec.answers else {record["label"]: 1.0}
        k = key(record)
        for prefix in (k[:n] for n in range(len(k) + 1)):  # () is every question
            counts = totals.setdefault(prefix, {})
            for answer, score in targets.items():
                if allowed is None or answer in allowed:
                    counts[answer] = counts.get(answer, 0.0) + float(score)

    def best(counts):
        return max(sorted(counts, key=str), key=lambda a: counts[a])  # ties: the first in sorted order

    predictions = {}
    for record in eval_records:
        k = key(record)
        counts = next(totals[k[:n]] for n in range(len(k), -1, -1) if totals.get(k[:n]))
        predictions[record[spec.id_field]] = best(counts)
    return predictions


def question_only_score(task: str, train_records, eval_records, answers=None) -> tuple[float, str]:
    """(the best question-only score on `eval_records`, what it keyed on: "question" or "question type").

    Records are annotation dicts as in the released files (VQA / GQA: sent, label, optional question_type; NLVR2:
    sent, label). `answers`: the answers the model can give (its label2ans); None allows every training answer."""
    id_field = get_task(task).id_field
    labels = {r[id_field]: r["label"] for r in eval_records}
    if not train_records or not labels:
        raise ValueError("the question-only baseline needs labelled training and evaluation records")
    results = []
    for name, key in _QUESTION_ONLY_KEYS.items():
        predictions = _question_only_predictions(task, train_records, eval_records, key, answers)
        results.append((evaluate(task, predictions, labels)["eval_score"], name))
    return max(results, key=lambda r: r[0])


def question_only_note(task: str, train_records, eval_records, answers=None) -> str:
    """What finetune.py prints beside a validation score: " (question only: 0.3059, the best training answer per
    question type)", or "" when either side has no labels (nothing to compare with)."""
    labelled = [r for r in eval_records or () if "label" in r]
    if not train_records or not labelled:
        return ""
    score, key = question_only_score(task, train_records, labelled, answers)
    return f" (question only: {score:.4f}, the best training answer per {key})"


# ---------------------------------------------------------------------------------------------------------------
# Submission files


def write_submission(task: str, predictions: Mapping, path) -> Path:
    """Write `predictions` (id -> answer string, or -> 0 / 1 for NLVR2) as the task's submission file."""
    path = Path(path)
    keys = get_task(task).submission_keys
    if keys is None:
        text = "".join(f"{identifier},{'True' if int(p) == 1 else 'False'}\n" for identifier, p in predictions.items())
    else:
        text = json.dumps([{keys[0]: qid, keys[1]: ans} for qid, ans in predictions.items()])
    return write_text(path, text)


def read_submission(task: str, path) -> dict:
    """Parse a submission file back into the predictions dict it was written from."""
    keys = get_task(task).submission_keys
    with open(path, encoding="utf-8", newline="") as f:
        if keys is not None:
            return {e[keys[0]]: e[keys[1]] for e in json.load(f)}
        out = {}
        for line_no, row in enumerate(csv.reader(f), start=1):
            if len(row) != 2 or row[1] not in ("True", "False"):
                raise ValueError(f"{path}:{line_no}: expected 'identifier,True|False', got {row!r}")
            out[row[0]] = int(row[1] == "True")
        return out


__all__ = ["evaluate", "question_only_note", "question_only_score", "read_submission", "write_submission"]
