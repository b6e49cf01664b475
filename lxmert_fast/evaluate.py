"""Score a fine-tuned model folder on an annotation file, and write the submission file; no training.

    python -m lxmert_fast.evaluate --model output/finetune_vqa/best_model \
        --features data/mscoco_imgfeat/val2014_obj36.tsv --annotations data/vqa/minival.json
    python -m lxmert_fast.evaluate --model DIR --features ... --annotations data/vqa/test.json \
        --submission test_predict.json          # a test split has no labels: the submission file only

Predictions come from lxmert_fast.predict's Predictor (the same code path as `python -m lxmert_fast.predict`),
the metrics and submission formats from lxmert_fast.tasks.scoring, as after each fine-tuning epoch: VQA score, GQA
accuracy, NLVR2 accuracy and consistency; VQA and GQA submissions as JSON, NLVR2 as "identifier,True|False" lines.
Records without a label are predicted (and submitted) but not scored.
"""

from __future__ import annotations

import argparse
import json
import sys

from lxmert_fast.cli import run
from lxmert_fast.predict import (
    PredictionError,
    Predictor,
    add_model_arguments,
    load_predictor,
    submission_predictions,
    write_json,
)
from lxmert_fast.tasks.scoring import evaluate, write_submission


def guess_qa_task(records) -> str:
    """VQA or GQA for records whose model and flags do not say: VQA's question ids are integers, GQA's strings."""
    return "vqa" if all(isinstance(r["question_id"], int) for r in records) else "gqa"


def evaluate_files(predictor: Predictor, paths, task: str | None = None) -> dict:
    """Predict every record of the annotation files and score the labelled ones.

    Returns {"task", "predictions" (id -> answer or 0 / 1, file order), "metrics" (evaluation.evaluate's dict, or
    None without labels), "labelled", "total"}."""
    records, sources = [], []
    for path in paths:
        part = predictor.read_file(path)
        records += part
        sources += [str(path)] * len(part)
    task = task or predictor.task or guess_qa_task(records)
    if (task == "nlvr2") == predictor.is_qa:
        raise PredictionError(f"task {task!r} does not fit {predictor.name}: it is {predictor.kind}")
    id_key = "identifier" if task == "nlvr2" else "question_id"
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lxmert_fast.evaluate",
        description="Score a fine-tuned LXMERT on VQA / GQA / NLVR2 annotations and write the submission file.",
    )
    add_model_arguments(p)
    p.add_argument("--annotations", required=True, help="comma-separated annotation JSON files (labels optional)")
    p.add_argument("--submission", help="write the task's submission file here (VQA / GQA JSON, NLVR2 CSV)")
    p.add_argument("--metrics-out", help="also write the metrics as JSON here")
    return p


def main(argv=None) -> dict:
    """Run the command line; returns evaluate_files' dict (predictions included)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    paths = [p for p in args.annotations.split(",") if p]
    result = evaluate_files(load_predictor(args), paths, args.task)
    summary = {"task": result["task"], "records": result["total"], "labelled": result["labelled"],
               **(result["metrics"] or {})}
    if result["metrics"] is None:
        print(f"{result['total']} records and no labels: nothing to score", file=sys.stderr)
    print(json.dumps(summary))
    if args.metrics_out:
        write_json(args.metrics_out, summary)
    if args.submission:
        path = write_submission(result["task"], result["predictions"], args.submission)
        print(f"submission written to {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    run(main)
