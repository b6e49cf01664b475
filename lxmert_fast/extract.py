"""Extract bottom-up-attention region features of your own images into the released TSV format.

    python -m lxmert_fast.extract IMAGES_DIR_OR_LIST --out FILE [--weights unc-nlp/frcnn-vg-finetuned]

IMAGES_DIR_OR_LIST is a folder (searched recursively for .jpg/.png/...) or a text file naming one image per line
(relative to the file's folder). Each image becomes one row (img_id = its file stem) of 36 regions (or between
--min-boxes and --max-boxes, e.g. 10 and 100) with their 2048-d features, boxes, object and attribute labels; the
file is read by every lxmert_fast command that takes --features. The run is resumable: rerun the same command
after an interruption and it continues where it stopped. Images are decoded in --workers DataLoader processes
and detected --batch-size at a time (on the GPU when there is one); padding a batch does not change any result.
Needs the extra: pip install -e ".[extract]".
"""

from __future__ import annotations

import argparse

from lxmert_fast.cli import plural, run
from lxmert_fast.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lxmert_fast.extract",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", help="a folder of images, or a text file naming one image per line")
    p.add_argument("--out", required=True, help="the TSV to write (appended to and resumed if it exists)")
    p.add_argument(
        "--weights",
        default="unc-nlp/frcnn-vg-finetuned",
        help="hub id, folder or weight file (.bin/.pt/.safetensors/.pkl) of the detector",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per detector call (default 4)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (default 2)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when there is one)")
    p.add_argument("--min-boxes", type=int, default=36, help="regions per image at least (default 36)")
    p.add_argument("--max-boxes", type=int, default=36, help="regions per image at most (default 36; 100 adaptive)")
    p.add_argument(
        "--rule",
        choices=("butd", "hf"),
        default="butd",
        help="box selection: the original bottom-up-attention's (default) or transformers' research FRCNN's",
    )
    p.add_argument("--min-size", type=int, default=600, help="shorter image side after resizing (default 600)")
    p.add_argument("--max-size", type=int, default=1000, help="longer image side at most (default 1000)")
    p.add_argument("--skip-bad", action="store_true", help="report unreadable images and go on instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def extract(args) -> dict:
    from lxmert_fast.detector import (
        FeatureExtractor,
        Selection,
        extract_to_tsv,
        list_images,
        load_detector,
    )

    for flag in ("batch_size", "min_boxes", "min_size", "max_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.workers < 0:
        raise InputError(f"--workers must not be negative, got {args.workers}")
    try:
        selection = Selection(rule=args.rule, min_boxes=args.min_boxes, max_boxes=args.max_boxes)
    except ValueError as err:
        raise InputError(f"--min-boxes / --max-boxes: {err}") from None
    paths = list_images(args.images)
    detector = load_detector(args.weights, min_size=args.min_size, max_size=args.max_size)
    extractor = FeatureExtractor(detector, selection, args.device)
    counts = extract_to_tsv(
        paths, args.out, extractor, args.batch_size, args.workers, args.skip_bad, progress=not args.no_progress
    )
    print(
        f"{args.out}: {plural(counts['written'], 'image')} written, {counts['done_before']} there before, "
        f"{counts['skipped']} skipped"
    )
    return counts


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)  # before torch is imported: --help and bad flags answer at once
    return extract(args)


if __name__ == "__main__":
    run(main)
