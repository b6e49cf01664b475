"""Score a fine-tuned model folder on an annotation file, and write the submission file; no training.

    python -m lxmert_fast.evaluate --model output/finetune_vqa/best_model \
        --features data/mscoco_imgfeat/val2014_obj36.tsv --annotations data/vqa/minival.json
    python -m lxmert_fast.evaluate --model DIR --features ... --annotations data/vqa/test.json \
        --submission test_predict.json          # a test split has no labels: the submission file only

Predictions come from lxmert_fast.use.predictor's Predictor (the same code path as `python -m lxmert_fast.predict`),
scored by lxmert_fast.use.evaluation with lxmert_fast.tasks.scoring's metrics and submission formats, as after each
fine-tuning epoch: VQA score, GQA accuracy, NLVR2 accuracy and consistency; VQA and GQA submissions as JSON, NLVR2
as "identifier,True|False" lines. Records without a label are predicted (and submitted) but not scored. The flags
are checked before torch and transformers load.
"""

from __future__ import annotations

import argparse
import json
import sys

from lxmert_fast.cli import run
from lxmert_fast.files import write_json
from lxmert_fast.predict import add_model_arguments, load_predictor


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
    from lxmert_fast.tasks.scoring import write_submission
    from lxmert_fast.use.evaluation import evaluate_files

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
