"""Plot a training run's metrics.jsonl to a PNG: training and validation loss, per-task losses, learning rate,
throughput.

    python -m lxmert_fast.plot_metrics output/pretrain/metrics.jsonl loss.png

matplotlib is optional for the project; this command says how to get it when it is missing.
"""

import argparse
import json
import sys

from lxmert_fast.cli import run
from lxmert_fast.errors import InputError, MissingDependencyError


def read_metrics(path, event="train"):
    """The records of one ``event`` (train: per step; eval: each evaluation) of a metrics.jsonl."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                print(f"{path}:{line_no}: skipping a malformed line", file=sys.stderr)
                continue
            if "step" in rec and rec.get("event") == event:
                records.append(rec)
    return records


def plot(records, out_png, title=None, evaluations=()):
    """``evaluations``: the eval records, drawn beside the training loss (pre-training's validation loss, or
    fine-tuning's eval_score on a second axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss_keys = sorted({k for r in records for k in r if k.endswith("_loss")})
    fig, (ax_loss, ax_task, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_loss.plot(steps, [r.get("loss") for r in records], label="training")
    ax_loss.set(xlabel="step", ylabel="loss", title="total loss")
    _plot_evaluations(ax_loss, [e for e in evaluations if e.get("split", "valid") == "valid"])
    for k in loss_keys:
        ax_task.plot(steps, [r.get(k) for r in records], label=k[: -len("_loss")])
    ax_task.set(xlabel="step", ylabel="loss", title="per-task loss", yscale="log")
    ax_task.legend()
    ax_lr.plot(steps, [r.get("lr") for r in records], color="tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="lr / samples per s")
    if any("samples_per_s" in r for r in records):
        ax_sps = ax_lr.twinx()
        ax_sps.plot(steps, [r.get("samples_per_s") for r in records], color="tab:orange", alpha=0.6)
        ax_sps.set_ylabel("samples/s", color="tab:orange")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _plot_evaluations(ax, evaluations):
    steps = [e["step"] for e in evaluations]
    if any("valid_loss" in e for e in evaluations):
        ax.plot(steps, [e.get("valid_loss") for e in evaluations], "o-", label="validation")
    if any("eval_score" in e for e in evaluations):
        score = ax.twinx()
        score.plot(steps, [e.get("eval_score") for e in evaluations], "s-", color="tab:red", label="eval_score")
        score.set_ylabel("eval_score", color="tab:red")
    ax.legend()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot metrics.jsonl (written by pretrain.py or finetune.py) to a PNG.")
    parser.add_argument("metrics", help="path to metrics.jsonl")
    parser.add_argument("out", help="output PNG")
    args = parser.parse_args(argv)
    records = read_metrics(args.metrics)
    if not records:
        raise InputError(f"{args.metrics}: no per-step records to plot")
    evaluations = read_metrics(args.metrics, "eval")
    try:
        plot(records, args.out, title=args.metrics, evaluations=evaluations)
    except ImportError:
        raise MissingDependencyError("plot_metrics needs matplotlib: pip install matplotlib") from None
    print(f"wrote {args.out} ({len(records)} steps, {len(evaluations)} evaluations)")


if __name__ == "__main__":
    run(main)
