"""Plot a training run's metrics.jsonl to a PNG: training and validation loss, per-task losses, learning rate,
throughput.

    python -m lxmert_fast.plot_metrics output/pretrain/metrics.jsonl loss.png

matplotlib is optional for the project; this command says how to get it when it is missing.
"""

import argparse
import json
import sys

from lxmert_fast.cli import plural, run
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
    """Draw ``figure(...)`` into ``out_png``."""
    import matplotlib.pyplot as plt

    fig = figure(records, title, evaluations)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _legend_below(ax, *twins):
    """One legend for an axis and its twins, under the plot, where it covers no curve."""
    handles, labels = [], []
    for axis in (ax, *twins):
        more = axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)


def figure(records, title=None, evaluations=()):
    """The run's curves against the optimiser step: total loss (with ``evaluations``, the eval records: pre-training's
    validation loss, or fine-tuning's eval_score on a second axis), per-task losses, learning rate and
    throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss_keys = sorted({k for r in records for k in r if k.endswith("_loss")})
    fig, (ax_loss, ax_task, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_loss.plot(steps, [r.get("loss") for r in records], label="training")
    ax_loss.set(xlabel="step", ylabel="loss", title="total loss")
    _legend_below(ax_loss, *_plot_evaluations(ax_loss, [e for e in evaluations if e.get("split", "valid") == "valid"]))
    for k in loss_keys:
        ax_task.plot(steps, [r.get(k) for r in records], label=k[: -len("_loss")])
    ax_task.set(xlabel="step", ylabel="loss", title="per-task loss", yscale="log")
    _legend_below(ax_task)
    ax_lr.plot(steps, [r.get("lr") for r in records], color="tab:green", label="learning rate")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="lr / samples per s")
    twins = []
    if any("samples_per_s" in r for r in records):
        twins.append(ax_lr.twinx())
        twins[0].plot(steps, [r.get("samples_per_s") for r in records], color="tab:orange", alpha=0.6,
                      label="samples/s")
        twins[0].set_ylabel("samples/s", color="tab:orange")
    _legend_below(ax_lr, *twins)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_evaluations(ax, evaluations) -> list:
    """Draw the evaluations on ``ax`` (a validation loss) or on a twin axis (eval_score); returns the twins."""
    steps = [e["step"] for e in evaluations]
    if any("valid_loss" in e for e in evaluations):
        ax.plot(steps, [e.get("valid_loss") for e in evaluations], "o-", label="validation")
    if any("eval_score" in e for e in evaluations):
        score = ax.twinx()
        score.plot(steps, [e.get("eval_score") for e in evaluations], "s-", color="tab:red", label="eval_score")
        score.set_ylabel("eval_score", color="tab:red")
        return [score]
    return []


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
    steps = len({r["step"] for r in records})  # a resumed run may log a step twice; log_every skips some
    print(f"wrote {args.out} (steps {records[0]['step']}-{records[-1]['step']}: {plural(steps, 'logged step')}, "
          f"{plural(len(evaluations), 'evaluation')})")


if __name__ == "__main__":
    run(main)
