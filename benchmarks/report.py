"""Benchmark results: the JSON document, its validation, and the markdown table and PNG plots made from it.

    python benchmarks/report.py benchmarks/results/<device>-<date>.json    (re)writes <same stem>.md and .png files
    python -m benchmarks.report <results.json>                             the same
    python benchmarks/report.py --merge OUT.json A.json B.json ...         one document from parts of a run on one
                                                                           device (e.g. two GPU calls), then OUT.md

The pytest session (benchmarks/conftest.py) writes the JSON and calls ``write_report`` at its end. Every number in
the outputs comes from the JSON, i.e. from one run on the device the file names; peaks are datasheet figures and
are labelled as such.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

SCHEMA = 1
ROLES = ("ours", "baseline", "reference")  # reference: a published figure, labelled, never measured
RATE_KEYS = ("ms", "tflops", "gbps", "roofline_fraction", "samples_per_s", "peak_mem_gb", "mfu", "paper_hours")


def make_document(device, mode, started, records, env):
    return {"schema": SCHEMA, "device": device, "mode": mode, "started": started, "env": env, "records": records}


def write_json(doc, path):
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def load(path):
    return json.loads(Path(path).read_text())


def _finite_positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def validate(doc):
    """Problems with a results document (empty list: well-formed). Checks what a reader relies on: the device is
    named, every measurement is a positive finite time, every case that has ours has a baseline, every speed-up
    is positive and finite and refers to a baseline of the same case."""
    problems = []
    for key in ("schema", "device", "mode", "started", "env", "records"):
        if key not in doc:
            problems.append(f"missing top-level key {key!r}")
    if problems:
        return problems
    if not doc["device"].get("name") or not doc["device"].get("slug"):
        problems.append("device has no name/slug")
    cases = defaultdict(list)
    for i, r in enumerate(doc["records"]):
        for key in ("suite", "case", "impl", "role", "ms"):
            if key not in r:
                problems.append(f"record {i} lacks {key!r}")
        if r.get("role") not in ROLES:
            problems.append(f"record {i} has role {r.get('role')!r}")
        for key in RATE_KEYS:
            if key in r and r[key] is not None and not _finite_positive(r[key]):
                problems.append(f"record {i} ({r.get('case')}/{r.get('impl')}): {key}={r[key]!r} is not positive")
        cases[(r.get("suite"), r.get("case"))].append(r)
    for (suite, case), recs in cases.items():
        ours = [r for r in recs if r.get("role") == "ours"]
        base = {r["impl"] for r in recs if r.get("role") in ("baseline", "reference")}
        if ours and not base:
            problems.append(f"{suite}/{case}: no baseline measured")
        for r in ours:
            speedup = r.get("speedup")
            if not speedup and base:
                problems.append(f"{suite}/{case}/{r['impl']}: no speed-up recorded")
            for impl, s in (speedup or {}).items():
                if impl not in base:
                    problems.append(f"{suite}/{case}/{r['impl']}: speed-up against unknown baseline {impl!r}")
                if not _finite_positive(s):
                    problems.append(f"{suite}/{case}/{r['impl']}: speed-up vs {impl} = {s!r}")
    return problems


# -- markdown ----------------------------------------------------------------------------------------------------
def _fmt(x, spec=".3g", suffix=""):
    return "" if x is None else f"{x:{spec}}{suffix}"


def _speedups(r):
    return ", ".join(f"{s:.2f}x vs {impl}" for impl, s in (r.get("speedup") or {}).items())


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


MODE_ORDER = {"fwd": 0, "bwd": 1, "both": 2}


def _case_key(r):
    p = r.get("params", {})
    return (p.get("kernel", ""), p.get("step", ""), r.get("dtype") or "", p.get("batch", 0),
            MODE_ORDER.get(p.get("mode"), 0), r["case"])


def _ordered(recs):
    return sorted(recs, key=lambda r: (_case_key(r), ROLES.index(r["role"]), r["impl"]))


def _notes(recs):
    """Implementations that could not run, once per case: SDPA backends refusing masks, failures."""
    seen, lines = set(), []
    for r in _ordered(recs):
        case = r["case"].rsplit("/", 1)[0] if r.get("params", {}).get("mode") else r["case"]
        for kind in ("unavailable", "failed"):
            for impl, why in (r.get("params", {}).get(kind) or {}).items():
                if (case, impl) not in seen:
                    seen.add((case, impl))
                    lines.append(f"- {case}: {impl} {kind}: {why}")
    return lines


def _header(doc):
    dev = doc["device"]
    out = [f"# lxmert_fast benchmarks: {dev['name']}", ""]
    out.append(f"Run started {doc['started']} ({doc['mode']} mode). Environment: "
               + ", ".join(f"{k} {v}" for k, v in doc["env"].items() if v) + ".")
    if dev.get("peaks"):
        p = dev["peaks"]
        out.append(f"Roofline from datasheet peaks (not measured): {p['hbm_gbps']} GB/s memory, "
                   + ", ".join(f"{k} {v} TFLOP/s" for k, v in p["tflops"].items()) + f"; source: {dev['peak_source']}.")
    if doc["mode"] != "full":
        out.append("**Smoke mode: tiny shapes, one iteration. These numbers check the harness; they are not speeds.**")
    return out


def _kernels_section(recs):
    out = ["", "## Kernels", "", "Speed-up = baseline time / ours, same inputs, same run. Roofline fraction = "
           "max(FLOPs / peak FLOP/s, minimal bytes / peak bandwidth) / time; it can exceed 1 where the working "
           "set stays in L2.", ""]
    rows = [[r["case"], r["impl"], _fmt(r["ms"], ".4f"), _fmt(r.get("tflops"), ".3g"), _fmt(r.get("gbps"), ".4g"),
             _fmt(100 * r["roofline_fraction"], ".0f", "%") if r.get("roofline_fraction") else "", _speedups(r)]
            for r in _ordered(recs)]
    out.append(_table(["case", "impl", "ms", "TFLOP/s", "GB/s", "roofline", "ours speed-up"], rows))
    after = [f"- {r['case']}: " + ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup_after_gemm"].items())
             for r in _ordered(recs) if r.get("speedup_after_gemm")]
    if after:
        out += ["", "Speed-up of the RoI embedding after the shared 2048->768 GEMM (timed alone in the same run):",
                "", *after]
    return out


def _model_section(title, recs):
    """Training step and inference, of the model on the device or of the CPU target."""
    out = ["", f"## {title}", ""]
    rows = [[r["case"], r["impl"], _fmt(r["ms"], ".2f"), _fmt(r.get("samples_per_s"), ".1f"),
             _fmt(r.get("tflops"), ".3g"), _fmt(r.get("peak_mem_gb"), ".2f"), _speedups(r)]
            for r in _ordered(recs)]
    out.append(_table(["case", "impl", "ms/step", "samples/s", "TFLOP/s", "peak GB", "ours speed-up"], rows))
    for r in recs:
        if r.get("target_speedup"):
            met = "met" if r["target_met"] else "NOT met"
            out.append(f"\nTarget {r['target_speedup']}x over transformers ({r['case']}): {met}.")
    return out


def _data_section(recs):
    out = ["", "## Pre-training data loader", ""]
    rows = [[r["case"], r["impl"], _fmt(r["ms"], ".1f"), _fmt(r.get("samples_per_s"), ".0f"), _speedups(r)]
            for r in _ordered(recs)]
    out.append(_table(["case", "impl", "ms/batch", "samples/s", "ours speed-up"], rows))
    return out


def _host_section(recs):
    out = ["", "## Host side of a training step (CPU time)", ""]
    rows = [[r["case"], r["impl"], _fmt(r["ms"], ".2f"),
             _fmt(r["bytes_per_sample"] / 1024, ".1f") if r.get("bytes_per_sample") else "",
             _fmt(r.get("worker_cpu_us_per_sample"), ".0f"),
             _fmt(r.get("main_cpu_ms_per_batch", r.get("main_cpu_ms_per_step")), ".2f"), _speedups(r)]
            for r in _ordered(recs)]
    out.append(_table(["case", "impl", "ms", "KiB/sample", "worker us/sample", "main ms/batch or step",
                       "ours speed-up"], rows))
    return out


def _pretrain_section(recs):
    out = ["", "## End to end: pre-training throughput and the paper's schedule", ""]
    rows = [[r["case"], r["impl"], _fmt(r.get("samples_per_s"), ".1f"),
             _fmt(100 * r["mfu"], ".1f", "%") if r.get("mfu") else "", _fmt(r.get("paper_hours"), ".1f"), _speedups(r)]
            for r in _ordered(recs)]
    out.append(_table(["case", "impl", "samples/s", "MFU", "hours for 670K x 256", "speed-up"], rows))
    for r in recs:
        if r.get("end_to_end_fraction"):
            out.append(f"\n{r['impl']}: end to end {r['samples_per_s']:.0f} samples/s = "
                       f"{100 * r['end_to_end_fraction']:.0f}% of the step alone ({r['step_only_samples_per_s']:.0f}; "
                       "target >= 80%).")
    ref = next((r for r in recs if r.get("paper_samples_per_s")), None)
    if ref:
        out.append("")
        out.append(f"Paper: 670K steps x 256 in 10 days on 4 Titan Xp = {ref['paper_samples_per_s']:.1f} "
                   f"samples/s (240 h); FLOPs per sample {ref['flops_per_sample'] / 1e9:.1f} G "
                   "(lxmert_fast/model/flops.py).")
    return out


def markdown(doc, plots=()):
    """The report: header, one section per suite present in the run, implementations that did not run, plots."""
    by_suite = defaultdict(list)
    for r in doc["records"]:
        by_suite[r["suite"]].append(r)
    out = _header(doc)
    if "kernels" in by_suite:
        out += _kernels_section(by_suite["kernels"])
    for suite, title in (("model", "Model: training step and inference"), ("cpu_target", "CPU target"),
                         ("predict", "Prediction: VQA answers (lxmert_fast.predict) vs transformers")):
        if suite in by_suite:
            out += _model_section(title, by_suite[suite])
    if "data" in by_suite:
        out += _data_section(by_suite["data"])
    if "host" in by_suite:
        out += _host_section(by_suite["host"])
    if "pretrain" in by_suite:
        out += _pretrain_section(by_suite["pretrain"])
    notes = _notes(doc["records"])
    if notes:
        out += ["", "## Implementations that did not run", "", *notes]
    for plot in plots:
        out += ["", f"![{Path(plot).stem}]({Path(plot).name})"]
    return "\n".join(out) + "\n"


# -- plots -------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_kernel_speedups(doc, path):
    plt = _pyplot()
    recs = [r for r in doc["records"] if r["suite"] == "kernels" and r["role"] == "ours" and r.get("speedup")]
    if not recs:
        return None
    kernels = sorted({r["params"].get("kernel", r["impl"]) for r in recs})
    fig, axes = plt.subplots(len(kernels), 1, figsize=(12, 3.6 * len(kernels)), squeeze=False)
    for ax, kernel in zip(axes[:, 0], kernels, strict=True):
        ks = sorted((r for r in recs if r["params"].get("kernel", r["impl"]) == kernel), key=_case_key)
        baselines = sorted({b for r in ks for b in r["speedup"]})
        width = 0.8 / max(len(baselines), 1)
        for j, b in enumerate(baselines):
            xs = [i + j * width for i, r in enumerate(ks) if b in r["speedup"]]
            ys = [r["speedup"][b] for r in ks if b in r["speedup"]]
            ax.bar(xs, ys, width, label=b)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ks))])
        ax.set_xticklabels([r["case"].split("/", 1)[-1] for r in ks], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speed-up of ours (x)")
        ax.set_title(f"{kernel}: ours vs baselines")
        ax.legend(fontsize=7)
    return _save(fig, path, f"{doc['device']['name']} ({doc['mode']} mode)")


def plot_throughput(doc, path):
    plt = _pyplot()
    recs = [r for r in doc["records"] if r["suite"] == "model" and r.get("samples_per_s") and "batch" in r["params"]]
    if not recs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, step in zip(axes, ("train", "infer"), strict=True):
        series = defaultdict(list)
        for r in recs:
            if r["params"].get("step") == step:
                series[f"{r['impl']} {r['dtype']}"].append((r["params"]["batch"], r["samples_per_s"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples/s")
        ax.set_title("training step" if step == "train" else "inference")
        ax.legend(fontsize=7)
    return _save(fig, path, f"LxmertForPreTraining throughput, {doc['device']['name']} ({doc['mode']} mode)")


def write_report(json_path):
    """Write <stem>.md and the plots (<stem>-kernel-speedup.png, <stem>-throughput.png) beside the JSON file.
    Plots need matplotlib; without it the markdown says so. Returns the written paths."""
    json_path = Path(json_path)
    doc = load(json_path)
    problems = validate(doc)
    stem = json_path.with_suffix("")
    plots, note = [], None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        note = "(plots skipped: matplotlib is not installed; `pip install matplotlib` and re-run report.py)"
    else:
        for fn, suffix in ((plot_kernel_speedups, "kernel-speedup"), (plot_throughput, "throughput")):
            p = fn(doc, Path(f"{stem}-{suffix}.png"))
            if p is not None:
                plots.append(p)
    text = markdown(doc, plots)
    if note:
        text += f"\n{note}\n"
    if problems:
        text += "\n## Problems found in the results file\n\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    md = Path(f"{stem}.md")
    md.write_text(text)
    return [md, *plots]


def merge(paths):
    """One document from results files of the same device: their records in order, the earliest start, and the
    environment of each part (they must agree on the device)."""
    docs = [load(p) for p in paths]
    names = {d["device"]["name"] for d in docs}
    if len(names) != 1:
        raise ValueError(f"cannot merge results of different devices: {sorted(names)}")
    first = min(docs, key=lambda d: d["started"])
    merged = make_document(first["device"], first["mode"], first["started"], [r for d in docs for r in d["records"]],
                           first["env"])
    merged["merged_from"] = [{"file": Path(p).name, "started": d["started"], "env": d["env"]}
                             for p, d in zip(paths, docs, strict=True)]
    return merged


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    if argv[0] == "--merge":
        if len(argv) < 3:
            print("usage: report.py --merge OUT.json A.json [B.json ...]", file=sys.stderr)
            return 2
        write_json(merge(argv[2:]), argv[1])
        argv = [argv[1]]
    status = 0
    for arg in argv:
        doc = load(arg)
        problems = validate(doc)
        for p in problems:
            print(f"{arg}: {p}", file=sys.stderr)
        status |= bool(problems)
        for out in write_report(arg):
            print(out)
    return status


if __name__ == "__main__":
    sys.exit(main())
