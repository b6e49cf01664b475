"""Scoring predictions on annotation files, as fine-tuning does after each epoch: a fine-tuned model folder's
predictions (lxmert_fast.use.predictor), or a predictions file already written in a task's submission format
(lxmert_fast.tasks.scoring: VQA test_predict.json, GQA submit_predict.json, NLVR2 test_predict.csv), scored with the
task's metrics; for VQA also the official accuracy of the evaluation server (lxmert_fast.tasks.vqa_official) on the
official question and annotation files. The command is lxmert_fast/evaluate.py.

    evaluate_files(predictor, annotation_paths, task=None) -> {"task", "predictions", "metrics", "labelled", "total"}
    read_predictions(path, task=None) -> (task, {id: answer or 0 / 1})    the task told by the file's format
    score_predictions(task, predictions, annotation_paths, source) -> the same dict as evaluate_files
    official_vqa_accuracy(predictions, annotation_file, question_file=None) -> the evaluation server's report
"""

from __future__ import annotations

import csv
import json

from lxmert_fast.cli import plural
from lxmert_fast.errors import PredictionError
from lxmert_fast.tasks.registry import TASKS, get_task
from lxmert_fast.tasks.scoring import evaluate


def guess_qa_task(records) -> str:
    """VQA or GQA for records whose model and flags do not say: VQA's question ids are integers, GQA's strings."""
    return "vqa" if all(isinstance(r["question_id"], int) for r in records) else "gqa"


def _check_unique(records, sources, id_key) -> None:
    seen = {}
    for record, source in zip(records, sources, strict=True):
        if record[id_key] in seen:
            raise PredictionError(f"{source}: {id_key} {record[id_key]!r} is also in {seen[record[id_key]]}")
        seen[record[id_key]] = source


def _score(task: str, predictions: dict, records) -> dict:
    labels = {r[get_task(task).id_field]: r["label"] for r in records if "label" in r}
    metrics = None
    if labels:
        metrics = evaluate(task, {k: v for k, v in predictions.items() if k in labels}, labels)
    return {"task": task, "predictions": predictions, "metrics": metrics, "labelled": len(labels),
            "total": len(records)}


def evaluate_files(predictor, paths, task: str | None = None) -> dict:
    """Predict every record of the annotation files with `predictor` (a use.predictor.Predictor) and score the
    labelled ones.

    Returns {"task", "predictions" (id -> answer or 0 / 1, file order), "metrics" (scoring.evaluate's dict, or
    None without labels), "labelled", "total"}."""
    from lxmert_fast.use.predictor import submission_predictions

    records, sources = [], []
    for path in paths:
        part = predictor.read_file(path)
        records += part
        sources += [str(path)] * len(part)
    task = task or predictor.task or guess_qa_task(records)
    spec = get_task(task)
    if spec.answers != predictor.is_qa:
        raise PredictionError(f"task {task!r} does not fit {predictor.name}: it is {predictor.kind}")
    _check_unique(records, sources, spec.id_field)
    predictions = submission_predictions(task, predictor.predict(records, source=", ".join(map(str, paths))))
    return _score(task, predictions, records)


# ---------------------------------------------------------------------------------------------------------------
# A predictions file in a submission format


def _json_task(path, entries) -> str:
    """The task whose submission keys the entries of a JSON predictions file carry."""
    keys = set(entries[0]) if entries and isinstance(entries[0], dict) else set()
    for name, spec in TASKS.items():
        if spec.submission_keys is not None and set(spec.submission_keys) == keys:
            return name
    formats = "; ".join(f"{name} [{{{', '.join(map(repr, spec.submission_keys))}}}]"
                        for name, spec in TASKS.items() if spec.submission_keys is not None)
    raise PredictionError(f"{path}: not a predictions file of a known format (entry 0 has keys {sorted(keys)}); "
                          f"expected {formats}, or NLVR2's CSV lines identifier,True|False")


def _read_json_predictions(path, entries, task) -> tuple[str, dict]:
    task = task or _json_task(path, entries)
    spec = get_task(task)
    if spec.submission_keys is None:
        raise PredictionError(f"{path}: a JSON file, but {task} predictions are CSV lines identifier,True|False")
    id_key, answer_key = spec.submission_keys
    predictions = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or id_key not in entry or not isinstance(entry.get(answer_key), str):
            raise PredictionError(f"{path}: entry {index}: expected {{{id_key!r}: ..., {answer_key!r}: \"...\"}} "
                                  f"({task}), got {entry!r}")
        if entry[id_key] in predictions:
            raise PredictionError(f"{path}: entry {index}: {id_key} {entry[id_key]!r} is predicted twice")
        predictions[entry[id_key]] = entry[answer_key]
    return task, predictions


def _read_csv_predictions(path, text) -> dict:
    predictions = {}
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if len(row) != 2 or row[1] not in ("True", "False"):
            raise PredictionError(f"{path}:{line_no}: expected NLVR2's 'identifier,True|False', got {row!r}")
        if row[0] in predictions:
            raise PredictionError(f"{path}:{line_no}: identifier {row[0]!r} is predicted twice")
        predictions[row[0]] = int(row[1] == "True")
    return predictions


def read_predictions(path, task: str | None = None) -> tuple[str, dict]:
    """(task, {id: answer, or 0 / 1 for NLVR2}) of a predictions file in the format write_submission writes: a JSON
    list tells VQA from GQA by its keys, anything else is read as NLVR2's CSV. `task`, when given, must fit."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    try:
        entries = json.loads(text)
    except json.JSONDecodeError:
        entries = None
    if isinstance(entries, list):
        return _read_json_predictions(path, entries, task)
    if task is not None and get_task(task).submission_keys is not None:
        raise PredictionError(f"{path}: expected {task}'s JSON list of {get_task(task).submission_keys} entries")
    predictions = _read_csv_predictions(path, text)
    if not predictions:
        raise PredictionError(f"{path}: no predictions in it")
    return "nlvr2", predictions


def score_predictions(task: str, predictions: dict, paths, source) -> dict:
    """Score `predictions` (read_predictions') on the annotation files' labelled records; the dict of
    evaluate_files. Every prediction must be of a record in the files (`source`, the predictions file, is named
    otherwise); records without a prediction are not scored and counted in "unpredicted"."""
    from lxmert_fast.data.finetune_dataset import read_annotations

    records, sources = [], []
    for path in paths:
        part = read_annotations(path, task, require_labels=False)
        records += part
        sources += [str(path)] * len(part)
    id_key = get_task(task).id_field
    _check_unique(records, sources, id_key)
    known = {r[id_key] for r in records}
    strangers = [k for k in predictions if k not in known]
    if strangers:
        raise PredictionError(f"{source}: {plural(len(strangers), 'prediction')} of ids in none of the annotation "
                              f"files ({', '.join(map(str, paths))}), e.g. {id_key} {strangers[0]!r}")
    predicted = [r for r in records if r[id_key] in predictions]
    result = _score(task, {r[id_key]: predictions[r[id_key]] for r in predicted}, predicted)
    result["unpredicted"] = len(records) - len(predicted)
    return result


def official_vqa_accuracy(predictions: dict, annotation_file, question_file=None) -> dict:
    """The VQA evaluation server's report (tasks.vqa_official.official_accuracy: percent) on the official
    annotation file's questions that `predictions` answers (a minival run is a part of val2014); a prediction of a
    question the file does not hold is an error."""
    from lxmert_fast.tasks.vqa_official import official_accuracy, read_official_annotations

    records = read_official_annotations(annotation_file, question_file)
    annotated = {r["question_id"] for r in records}
    strangers = [k for k in predictions if k not in annotated]
    if strangers:
        raise PredictionError(f"{annotation_file}: {plural(len(strangers), 'predicted question')} not in it, e.g. "
                              f"question_id {strangers[0]!r}: the predictions and the annotations are not of one split")
    report = official_accuracy(predictions, [r for r in records if r["question_id"] in predictions])
    report["annotated"] = len(records)
    return report


__all__ = ["evaluate_files", "guess_qa_task", "official_vqa_accuracy", "read_predictions", "score_predictions"]
