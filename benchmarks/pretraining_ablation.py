"""Does pre-training help? The paper's ablation in miniature, on the sample data and the CPU.

1. Pre-train with configs/recipe_sample_pretrain.json (skipped with --pretrained FOLDER).
2. For each seed, fine-tune VQA twice on the same budget (epochs, batch, AdamW at one learning rate): from the
   pre-trained encoder (--load) and from scratch (--from-scratch with the same model config).
3. Per run, from its metrics.jsonl: the validation VQA score after each epoch and the score with the images
   shuffled between questions; the first update after which the model uses the image (its score beats the
   shuffled-images score by --margin), the final and the best score.

Writes benchmarks/results/<device>-<date>-pretraining-ablation.{json,md} (device and date of this machine) and
prints the markdown table.

    python benchmarks/pretraining_ablation.py                      # pre-train, then 3 seeds x 2 starts
    python benchmarks/pretraining_ablation.py --pretrained output/pretrain_sample/final_model --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipe_sample_pretrain.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", help="a pre-trained model folder (default: pre-train with the sample recipe)")
    p.add_argument("--work-dir", default="output/pretraining_ablation", help="where the runs write")
    p.add_argument("--sample-data-dir", default="sample_data", help="the sample data (generated there if needed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs of each run")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning AdamW learning rate of both starts")
    p.add_argument("--margin", type=float, default=0.05, help="'uses the image': score - shuffled score above this")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def run(cmd, log_path):
    """Run ``cmd`` with its output in ``log_path``; its wall time, or SystemExit naming the log on failure."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        sys.exit(f"{' '.join(cmd)} failed (exit {rc}); its output: {log_path}")
    return time.perf_counter() - t0


def pretrain(work: Path, sample_dir: str):
    out = work / "pretrain"
    seconds = run([sys.executable, "-m", "lxmert_fast.pretrain", "--config", str(RECIPE), "--output-dir", str(out),
                   "--sample-data-dir", sample_dir, "--overwrite"], work / "pretrain.log")
    return out / "final_model", seconds, last_validation(out / "metrics.jsonl")


def last_validation(metrics_file: Path) -> dict:
    evals = [r for r in read_metrics(metrics_file) if r.get("event") == "eval"]
    return {k: v for k, v in evals[-1].items() if k.startswith("valid_")} if evals else {}


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finetune(work: Path, start: str, pretrained: str, seed: int, args) -> dict:
    """One VQA fine-tuning run from ``start`` ("pretrained" or "scratch"); its per-epoch scores."""
    out = work / f"vqa_{start}_seed{seed}"
    origin = ["--load", pretrained] if start == "pretrained" else [
        "--from-scratch", "--model-config", str(Path(pretrained) / "config.json")]
    cmd = [sys.executable, "-m", "lxmert_fast.finetune", "--task", "vqa", *origin, "--engine", "torch",
           "--sample-data-dir", args.sample_data_dir,
           "--optimizer", "adamw", "--lr", str(args.lr), "--epochs", str(args.epochs), "--seed", str(seed),
           "--images-shuffled-score", "--output-dir", str(out), "--overwrite"]
    seconds = run(cmd, work / f"vqa_{start}_seed{seed}.log")
    records = read_metrics(out / "metrics.jsonl")
    scores = {r["step"]: r["eval_score"] for r in records if r.get("split") == "valid"}
    shuffled = {r["step"]: r["eval_score"] for r in records if r.get("split") == "valid_images_shuffled"}
    curve = [{"step": s, "score": scores[s], "images_shuffled": shuffled.get(s)} for s in sorted(scores)]
    grounded = next((c["step"] for c in curve if c["images_shuffled"] is not None
                     and c["score"] - c["images_shuffled"] > args.margin), None)
    return {"start": start, "seed": seed, "curve": curve, "final": curve[-1]["score"],
            "final_images_shuffled": curve[-1]["images_shuffled"], "best": max(scores.values()),
            "uses_image_after_step": grounded, "seconds": seconds}


def table(runs: list[dict]) -> str:
    lines = ["| start | seed | uses the image after update | final score | images shuffled | best score |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        when = r["uses_image_after_step"] if r["uses_image_after_step"] is not None else "never"
        lines.append(f"| {r['start']} | {r['seed']} | {when} | {r['final']:.3f} | {r['final_images_shuffled']:.3f} "
                     f"| {r['best']:.3f} |")
    for start in ("pretrained", "scratch"):
        finals = [r["final"] for r in runs if r["start"] == start]
        if finals:
            spread = statistics.pstdev(finals) if len(finals) > 1 else 0.0
            lines.append(f"| **{start}, mean** | {len(finals)} seeds | | **{statistics.mean(finals):.3f}** "
                         f"(+- {spread:.3f}) | | |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    record = {"device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "finetune": {"task": "vqa", "epochs": args.epochs, "optimizer": "adamw", "lr": args.lr}}
    pretrained = args.pretrained
    if pretrained is None:
        folder, seconds, validation = pretrain(work, args.sample_data_dir)
        pretrained = str(folder)
        record["pretrain"] = {"recipe": str(RECIPE.relative_to(ROOT)), "seconds": seconds, "validation": validation}
        print(f"pre-trained in {seconds:.0f} s: {validation}", flush=True)
    record["pretrained"] = pretrained
    runs = []
    for seed in args.seeds:
        for start in ("pretrained", "scratch"):
            runs.append(finetune(work, start, pretrained, seed, args))
            r = runs[-1]
            print(f"{start} seed {seed}: final {r['final']:.3f} (images shuffled {r['final_images_shuffled']:.3f}), "
                  f"uses the image after update {r['uses_image_after_step']}, {r['seconds']:.0f} s", flush=True)
    record["runs"] = runs
    text = table(runs)
    print(text)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"cpu-{os.cpu_count()}-cores-{record['date']}-pretraining-ablation"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(f"# Pre-training ablation on the sample ({record['device']}, {record['date']})"
                                       f"\n\n`{record['command']}`\n\n{text}\n")
    print(f"results: {stem}.json, .md")


if __name__ == "__main__":
    main()
