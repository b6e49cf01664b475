"""Scoring a fine-tuned model folder on annotation files, as fine-tuning does after each epoch: the Predictor's
predictions (lxmert_fast.use.predictor), the task's metrics (lxmert_fast.tasks.scoring). The command is
lxmert_fast/evaluate.py."""

from __future__ import annotations

from lxmert_fast.errors import PredictionError
from lxmert_fast.tasks.registry import get_task
from lxmert_fast.tasks.scoring import evaluate
from lxmert_fast.use.predictor import Predictor, submission_predictions


def guess_qa_task(records) -> str:
    """VQA or GQA for records whose model and flags do not say: VQA's question ids are integers, GQA's strings."""
    return "vqa" if all(isinstance(r["question_id"], int) for r in records) else "gqa"


def evaluate_files(predictor: Predictor, paths, task: str | None = None) -> dict:
    """Predict every record of the annotation files and score the labelled ones.

    Returns {"task", "predictions" (id -> answer or 0 / 1, file order), "metrics" (scoring.evaluate's dict, or
    None without labels), "labelled", "total"}."""
    records, sources = [], []
    for path in paths:
        part = predictor.read_file(path)
        records += part
        sources += [str(path)] * len(part)
    task = task or predictor.task or guess_qa_task(records)
    spec = get_task(task)
    if spec.answers != predictor.is_qa:
        raise PredictionError(f"task {task!r} does not fit {predictor.name}: it is {predictor.kind}")
    id_key = spec.id_field
    seen = {}
    for record, source in zip(records, sources, strict=True):
        if record[id_key] in seen:
            raise PredictionError(f"{source}: {id_key} {record[id_key]!r} is also in {seen[record[id_key]]}")
        seen[record[id_key]] = source
    predictions = submission_predictions(task, predictor.predict(records, source=", ".join(map(str, paths))))
    labels = {r[id_key]: r["label"] for r in records if "label" in r}
    metrics = None
    if labels:
        metrics = evaluate(task, {k: v for k, v in predictions.items() if k in labels}, labels)
    return {"task": task, "predictions": predictions, "metrics": metrics, "labelled": len(labels),
            "total": len(records)}


__all__ = ["evaluate_files", "guess_qa_task"]
