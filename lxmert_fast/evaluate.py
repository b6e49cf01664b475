"""Score a fine-tuned model folder, or a predictions file, on annotation files; no training.

    python -m lxmert_fast.evaluate --model output/finetune_vqa/best_model \
        --features data/mscoco_imgfeat/val2014_obj36.tsv --annotations data/vqa/minival.json
    python -m lxmert_fast.evaluate --model DIR --features ... --annotations data/vqa/test.json \
        --submission test_predict.json          # a test split has no labels: the submission file only
    python -m lxmert_fast.evaluate --predictions output/finetune_vqa/test_predict.json \
        --annotations data/vqa/minival.json     # a file written before: no model, no features
    python -m lxmert_fast.evaluate --predictions minival_predict.json --annotations data/vqa/minival.json \
        --vqa-questions v2_OpenEnded_mscoco_val2014_questions.json \
        --vqa-annotations v2_mscoco_val2014_annotations.json   # + the evaluation server's VQA accuracy

Predictions come from lxmert_fast.use.predictor's Predictor (the same code path as `python -m lxmert_fast.predict`),
or from --predictions, a file in the task's submission format (VQA test_predict.json [{question_id, answer}], GQA
submit_predict.json [{questionId, prediction}], NLVR2 test_predict.csv lines identifier,True|False; the format tells
the task). They are scored by lxmert_fast.use.evaluation with lxmert_fast.tasks.scoring's metrics, as after each
fine-tuning epoch: VQA score (the original's soft score, 0-1), GQA accuracy, NLVR2 accuracy and consistency. Given
the official VQA v2 annotation file (ten human answers a question), also the evaluation server's accuracy (percent,
"official": overall and per answer type printed; --metrics-out also holds it per question type). Records without a
label are predicted (and submitted) but not scored. The flags are checked before torch and transformers load.
"""

from __future__ import annotations

import argparse
import json
import sys

from lxmert_fast.cli import plural, run
from lxmert_fast.files import write_json
from lxmert_fast.predict import add_model_arguments, load_predictor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lxmert_fast.evaluate",
        description="Score a fine-tuned LXMERT, or a predictions file, on VQA / GQA / NLVR2 annotations.",
    )
    add_model_arguments(p, model_required=False, features_required=False)
    p.add_argument("--predictions", help="score this predictions file (a submission file: VQA / GQA JSON, NLVR2 "
                   "CSV) instead of a model's predictions; no --model, no --features")
    p.add_argument("--annotations", help="comma-separated annotation JSON files (labels optional)")
    p.add_argument("--submission", help="write the task's submission file here (VQA / GQA JSON, NLVR2 CSV)")
    p.add_argument("--metrics-out", help="also write the metrics as JSON here")
    official = p.add_argument_group("the official VQA v2 accuracy (the evaluation server's vqaEval.py)")
    official.add_argument("--vqa-annotations", help="the official annotation file, e.g. "
                          "v2_mscoco_val2014_annotations.json: ten human answers a question")
    official.add_argument("--vqa-questions", help="its question file, e.g. v2_OpenEnded_mscoco_val2014_questions.json "
                          "(checked to be of the same split)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.predictions is None):
        parser.error("give --model (with --features) to predict, or --predictions FILE to score a file written before")
    if args.model is not None and args.features is None:
        parser.error("--model needs --features (the object features of the annotations' images)")
    if args.predictions is not None and (args.features or args.submission):
        parser.error(f"--predictions is scored as it is: {'--features' if args.features else '--submission'} is "
                     "for --model")
    if args.vqa_questions is not None and args.vqa_annotations is None:
        parser.error("--vqa-questions goes with --vqa-annotations (the file with the ten answers a question)")
    if args.annotations is None and not (args.predictions and args.vqa_annotations):
        parser.error("--annotations is required (without it, only --predictions with --vqa-annotations)")
    if args.vqa_annotations is not None and args.task not in (None, "vqa"):
        parser.error(f"--vqa-annotations is VQA's official accuracy, not {args.task}'s")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def predict_and_score(args) -> dict:
    """evaluation.evaluate_files' dict for --model, score_predictions' for --predictions; "official" added with
    --vqa-annotations."""
    from lxmert_fast.errors import PredictionError
    from lxmert_fast.use import evaluation

    def check_official_fits(task):
        if args.vqa_annotations is not None and task != "vqa":
            raise PredictionError(f"--vqa-annotations is VQA's official accuracy; these are {task} predictions")

    paths = [p for p in (args.annotations or "").split(",") if p]
    if args.predictions is None:
        result = evaluation.evaluate_files(load_predictor(args), paths, args.task)
    else:
        task, predictions = evaluation.read_predictions(args.predictions, args.task)
        check_official_fits(task)
        if paths:
            result = evaluation.score_predictions(task, predictions, paths, args.predictions)
        else:
            result = {"task": task, "predictions": predictions, "metrics": None, "labelled": 0,
                      "total": len(predictions)}
    check_official_fits(result["task"])
    if args.vqa_annotations is not None:
        result["official"] = evaluation.official_vqa_accuracy(result["predictions"], args.vqa_annotations,
                                                              args.vqa_questions)
    return result


def main(argv=None) -> dict:
    """Run the command line; returns evaluate_files' (or score_predictions') dict, predictions included."""
    args = parse_args(argv)
    result = predict_and_score(args)
    summary = {"task": result["task"], "records": result["total"], "labelled": result["labelled"],
               **(result["metrics"] or {})}
    if result.get("unpredicted"):
        summary["unpredicted"] = result["unpredicted"]
        print(f"{plural(result['unpredicted'], 'annotated record')} without a prediction in {args.predictions}: "
              f"not scored", file=sys.stderr)
    if result["metrics"] is None and args.annotations:
        print(f"{plural(result['total'], 'record')} and no labels: nothing to score", file=sys.stderr)
    printed = dict(summary)
    if "official" in result:
        summary["official"] = result["official"]
        printed["official"] = {k: v for k, v in result["official"].items() if k != "perQuestionType"}
    print(json.dumps(printed))
    if args.metrics_out:
        write_json(args.metrics_out, summary)
    if args.submission:
        from lxmert_fast.tasks.scoring import write_submission

        path = write_submission(result["task"], result["predictions"], args.submission)
        print(f"submission written to {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    run(main)
