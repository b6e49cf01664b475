"""Ask a fine-tuned LXMERT from the command line: VQA / GQA answers with their scores (top-k on request), NLVR2
true / false; JSON out.

    python -m lxmert_fast.predict --model DIR --features x.tsv --questions q.json [--top-k K] [--out preds.json]
    python -m lxmert_fast.predict --model DIR --features x.tsv --img-id ID --question "what color is the dog?"
    python -m lxmert_fast.predict --model DIR --features x.tsv --img-ids LEFT RIGHT --statement "..."
    python -m lxmert_fast.predict --model DIR --image cat.jpg --question "what color is the cat?"
    python -m lxmert_fast.predict --model DIR --images left.jpg right.jpg --statement "..."

With --image / --images, your own pictures' region features are extracted first (lxmert_fast.detector: the
bottom-up-attention Faster R-CNN, weights from --detector; needs `pip install -e ".[extract]"`).

The library behind it is lxmert_fast.use.predictor (the Predictor, for Python); the model folder is read by
lxmert_fast.model.folder. The flags are checked before torch and transformers load.
"""

from __future__ import annotations

import argparse
import json
import sys

from lxmert_fast.cli import run
from lxmert_fast.errors import PredictionError
from lxmert_fast.files import write_json
from lxmert_fast.tasks.registry import TASK_NAMES


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True,
                        features_required: bool = True) -> None:
    """The flags that load a Predictor (shared with lxmert_fast.evaluate, where a predictions file can stand in for
    --model and --features; predict's own pictures (--image) stand in for --features)."""
    p = parser.add_argument_group("model and features")
    p.add_argument("--model", required=model_required,
                   help="fine-tuned model folder (or hub id, read from the hub cache)")
    p.add_argument("--features", required=features_required,
                   help="comma-separated object-feature TSVs (or feature stores)")
    p.add_argument("--answers", help="label2ans / ans2label JSON, for a model whose config has no id2label")
    p.add_argument("--tokenizer", help="tokenizer folder or name, for a model folder without one")
    p.add_argument("--task", choices=TASK_NAMES, help="default: what the model and the file say")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    p.add_argument("--fast", action="store_true", help="int8 linear layers on a CPU, bf16 on a GPU: faster, inexact")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=20, help="questions are cut to this many tokens (20)")


def load_predictor(args):
    """The Predictor of add_model_arguments' flags (torch and the model load here, after the flags are checked)."""
    from lxmert_fast.use.predictor import Predictor

    return Predictor.from_pretrained(
        args.model,
        args.features or (),
        answers=args.answers,
        tokenizer=args.tokenizer,
        task=args.task,
        device=args.device,
        fast=args.fast,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lxmert_fast.predict",
        description="Answer VQA / GQA questions or judge NLVR2 statements with a fine-tuned LXMERT; JSON out.",
    )
    add_model_arguments(p, features_required=False)
    what = p.add_argument_group("what to predict (one of)")
    what.add_argument("--questions", help="a VQA / GQA / NLVR2 annotation JSON file (labels optional)")
    what.add_argument("--question", help="one VQA / GQA question, about --img-id or --image")
    what.add_argument("--img-id", help="the image of --question, in --features")
    what.add_argument("--image", help="the image of --question: your own picture (its features are extracted)")
    what.add_argument("--statement", help="one NLVR2 statement, about --img-ids or --images LEFT RIGHT")
    what.add_argument("--img-ids", nargs=2, metavar=("LEFT", "RIGHT"), help="the image pair of --statement")
    what.add_argument("--images", nargs=2, metavar=("LEFT", "RIGHT"), help="the picture pair of --statement")
    p.add_argument("--detector", default="unc-nlp/frcnn-vg-finetuned",
                   help="detector weights for --image / --images: a hub id, a folder or a file")
    p.add_argument("--top-k", type=int, help="VQA / GQA: also list the k best answers with their scores")
    p.add_argument("--out", help="write the JSON here (default: print it)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [flag for flag, value in (("--questions", args.questions), ("--question", args.question),
                                      ("--statement", args.statement)) if value is not None]
    if len(given) != 1:
        parser.error(f"give exactly one of --questions, --question, --statement (got {', '.join(given) or 'none'})")
    _check_images(parser, args)
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def _check_images(parser, args) -> None:
    """Which image(s) a typed question or statement is about: exactly one way, and features to find them in."""
    for text, one, own in (("--question", "--img-id", "--image"), ("--statement", "--img-ids", "--images")):
        given = getattr(args, text[2:]) is not None
        ways = [flag for flag in (one, own) if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given and len(ways) != 1:
            parser.error(f"{text} needs one of {one} (in --features) or {own} (your own pictures)")
        if not given and ways:
            parser.error(f"{ways[0]} goes with {text}")
    if args.features is None and args.image is None and args.images is None:
        parser.error("give --features (object-feature TSVs), or --image / --images for your own pictures")


def main(argv=None):
    """Run the command line; returns the results (a list, or one dict for a typed question or statement)."""
    args = parse_args(argv)
    predictor = load_predictor(args)
    if args.image is not None:
        (args.img_id,) = predictor.add_images([args.image], args.detector)
    if args.images is not None:
        args.img_ids = predictor.add_images(args.images, args.detector)
    if args.questions is not None:
        results = predictor.predict_file(args.questions, top_k=args.top_k)
    elif args.question is not None:
        if not predictor.is_qa:
            raise PredictionError(f"--question: {args.model} is {predictor.kind}; give it --statement and "
                                  "--img-ids LEFT RIGHT")
        results = predictor.ask(args.question, args.img_id, top_k=args.top_k)
    else:
        if predictor.is_qa:
            raise PredictionError(f"--statement: {args.model} is {predictor.kind}; give it --question and --img-id")
        results = predictor.judge(args.statement, *args.img_ids)
    if args.out:
        print(f"predictions written to {write_json(args.out, results)}", file=sys.stderr)
    else:
        print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    run(main)
