"""Fine-tuning metrics and the official submission files of VQA v2, GQA and NLVR2.

Metrics, as the original's evaluators (`src/tasks/*_data.py`), over the predicted questions:
    vqa_score          mean over questions of the predicted answer's soft score in the label (0 when absent)
    gqa_accuracy       the same formula; GQA labels hold one answer with score 1.0, so it is plain accuracy
    nlvr2_accuracy     fraction of pairs whose predicted truth value (0 / 1) equals the label
    nlvr2_consistency  fraction of sentences whose every pair is right; a sentence is the identifier without its
                       last "-N" part ("dev-850-0-3" -> "dev-850-0"), as the official NLVR2 script
    evaluate(task, predictions, labels) -> {"eval_score": main metric, ...}
Every predicted id must have a label (KeyError otherwise): a silent 0 would hide a mismatched file.

Submission files (written atomically):
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
import os
from collections.abc import Mapping
from pathlib import Path

MAIN_METRIC = {"vqa": "vqa_score", "gqa": "accuracy", "nlvr2": "accuracy"}


def _labels_for(predictions: Mapping, labels: Mapping):
    if not predictions:
        raise ValueError("no predictions to evaluate")
    missing = [qid for qid in predictions if qid not in labels]
    if missing:
        raise KeyError(f"{len(missing)} predicted ids have no label, e.g. {missing[:3]}")
    return ((predictions[qid], labels[qid]) for qid in predictions)


def vqa_score(predictions: Mapping, labels: Mapping[object, Mapping[str, float]]) -> float:
    """predictions: question_id -> answer; labels: question_id -> {answer: soft score}."""
    pairs = list(_labels_for(predictions, labels))
    return sum(float(label.get(answer, 0.0)) for answer, label in pairs) / len(pairs)


def gqa_accuracy(predictions: Mapping, labels: Mapping[object, Mapping[str, float]]) -> float:
    """predictions: question_id -> answer; labels: question_id -> {answer: 1.0}."""
    return vqa_score(predictions, labels)


def nlvr2_accuracy(predictions: Mapping[str, int], labels: Mapping[str, int]) -> float:
    """predictions, labels: identifier -> 0 | 1."""
    pairs = list(_labels_for(predictions, labels))
    return sum(int(p) == int(y) for p, y in pairs) / len(pairs)


def sentence_id(identifier: str) -> str:
    """NLVR2 identifier ("split-set-pair-sentence") -> its sentence, as the official metrics.py groups them: the
    pair field blanked, "dev-850-0-3" -> "dev-850--3" (the image pairs "dev-850-0-3" .. "dev-850-3-3" share it)."""
    fields = identifier.split("-")
    if len(fields) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r}: expected split-set-pair-sentence")
    fields[2] = ""
    return "-".join(fields)


def nlvr2_consistency(predictions: Mapping[str, int], labels: Mapping[str, int]) -> float:
    """Fraction of sentences all of whose (predicted) image pairs are right (the official NLVR2 consistency)."""
    _labels_for(predictions, labels)
    all_right: dict[str, bool] = {}
    for identifier, p in predictions.items():
        sid = sentence_id(identifier)
        all_right[sid] = all_right.get(sid, True) and int(p) == int(labels[identifier])
    return sum(all_right.values()) / len(all_right)


def evaluate(task: str, predictions: Mapping, labels: Mapping) -> dict[str, float]:
    """The task's metrics; `eval_score` is its main one (VQA score, GQA accuracy, NLVR2 accuracy)."""
    if task == "vqa":
        metrics = {"vqa_score": vqa_score(predictions, labels)}
    elif task == "gqa":
        metrics = {"accuracy": gqa_accuracy(predictions, labels)}
    elif task == "nlvr2":
        metrics = {
            "accuracy": nlvr2_accuracy(predictions, labels),
            "consistency": nlvr2_consistency(predictions, labels),
        }
    else:
        raise ValueError(f"unknown task {task!r}")
    return {"eval_score": metrics[MAIN_METRIC[task]], **metrics}


# ---------------------------------------------------------------------------------------------------------------
# Question-only baseline

_QUESTION_ONLY_KEYS = {
    "question": lambda r: (r.get("question_type"), r["sent"].strip().lower()),  # unseen text: back off to the type
    "question type": lambda r: (r.get("question_type"),),
}


def _question_only_predictions(task: str, train_records, eval_records, key, answers=None) -> dict:
    """{id: the training answer with the highest summed score among training questions sharing the longest prefix
    of `key`} (NLVR2: label counts per statement); answers outside `answers` (the model's vocabulary) never win."""
    id_field = "identifier" if task == "nlvr2" else "question_id"
    allowed = None if answers is None else set(answers)
    totals: dict[tuple, dict] = {}
    for record in train_records:
        targets = {record["label"]: 1.0} if task == "nlvr2" else record["label"]
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
        predictions[record[id_field]] = best(counts)
    return predictions


def question_only_score(task: str, train_records, eval_records, answers=None) -> tuple[float, str]:
    """(the best question-only score on `eval_records`, what it keyed on: "question" or "question type").

    Records are annotation dicts as in the released files (VQA / GQA: sent, label, optional question_type; NLVR2:
    sent, label). `answers`: the answers the model can give (its label2ans); None allows every training answer."""
    labels = {r["identifier" if task == "nlvr2" else "question_id"]: r["label"] for r in eval_records}
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


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_submission(task: str, predictions: Mapping, path) -> Path:
    """Write `predictions` (id -> answer string, or -> 0 / 1 for NLVR2) as the task's submission file."""
    path = Path(path)
    if task == "vqa":
        text = json.dumps([{"question_id": qid, "answer": ans} for qid, ans in predictions.items()])
    elif task == "gqa":
        text = json.dumps([{"questionId": qid, "prediction": ans} for qid, ans in predictions.items()])
    elif task == "nlvr2":
        text = "".join(f"{identifier},{'True' if int(p) == 1 else 'False'}\n" for identifier, p in predictions.items())
    else:
        raise ValueError(f"unknown task {task!r}")
    _atomic_text(path, text)
    return path


def read_submission(task: str, path) -> dict:
    """Parse a submission file back into the predictions dict it was written from."""
    with open(path, encoding="utf-8", newline="") as f:
        if task == "vqa":
            return {e["question_id"]: e["answer"] for e in json.load(f)}
        if task == "gqa":
            return {e["questionId"]: e["prediction"] for e in json.load(f)}
        if task == "nlvr2":
            out = {}
            for line_no, row in enumerate(csv.reader(f), start=1):
                if len(row) != 2 or row[1] not in ("True", "False"):
                    raise ValueError(f"{path}:{line_no}: expected 'identifier,True|False', got {row!r}")
                out[row[0]] = int(row[1] == "True")
            return out
    raise ValueError(f"unknown task {task!r}")


SUBMISSION_NAME = {"vqa": "test_predict.json", "gqa": "submit_predict.json", "nlvr2": "test_predict.csv"}

__all__ = [
    "MAIN_METRIC",
    "SUBMISSION_NAME",
    "evaluate",
    "gqa_accuracy",
    "nlvr2_accuracy",
    "nlvr2_consistency",
    "question_only_note",
    "question_only_score",
    "read_submission",
    "sentence_id",
    "vqa_score",
    "write_submission",
]
