"""Benchmark harness: the ``--benchmark`` switch, shapes per mode, device peaks, timers and the results file.

    pytest benchmarks/               smoke mode: tiny shapes, one timed iteration; checks the harness, not speed (CI)
    pytest benchmarks/ --benchmark   the full suite at LXMERT shapes; results in benchmarks/results/
    --benchmark-results-dir DIR      the results file (JSON, markdown, plots) goes to DIR instead

Every test measures its implementation and its baselines in the same process on the same inputs and hands the
numbers to the session's ``Bench`` (fixture ``bench``), which writes ``<device-slug>-<date>.json`` after every case
(a run stopped part-way keeps what it measured) and the markdown table and plots at the end (benchmarks/report.py).
In smoke mode all of that goes to a temporary folder unless --benchmark-results-dir names one.

GPU timings replay a CUDA graph of many calls (launch overhead of ~10 us kernels would otherwise dominate) and fall
back to CUDA-event timing of plain calls when a function cannot be captured; CPU timings are wall-clock medians. The
timed function of each test also goes through pytest-benchmark (synchronised), whose ``extra_info`` carries the same
record.
"""

import datetime
import importlib.util
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under Triton's interpreter; it must be chosen before any kernel is defined.
INTERPRETER_SET_HERE = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if INTERPRETER_SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def _load_report():
    # report.py is also a script (python benchmarks/report.py results.json); load it by path so that neither the
    # folder nor the module name has to be importable.
    spec = importlib.util.spec_from_file_location("lxmert_fast_bench_report", HERE / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = _load_report()

# Datasheet peaks, dense (no structured sparsity): NVIDIA H100 Tensor Core GPU datasheet (SXM5, PCIe, NVL columns),
# NVIDIA H200 datasheet, NVIDIA A100 datasheet. Keyed by a substring of torch.cuda.get_device_name(); the first
# match wins, so the more specific names come first. fp32 is the non-tensor-core figure (PyTorch does not use TF32
# for fp32 products by default).
DEVICE_PEAKS = [
    ("H100 PCIe", {"hbm_gbps": 2000, "tflops": {"fp16": 756, "bf16": 756, "fp32": 51}}),
    ("H100 NVL", {"hbm_gbps": 3900, "tflops": {"fp16": 835, "bf16": 835, "fp32": 60}}),
    ("H100", {"hbm_gbps": 3350, "tflops": {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}}),
    ("H200", {"hbm_gbps": 4800, "tflops": {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}}),
    ("A100-SXM4-80GB", {"hbm_gbps": 2039, "tflops": {"fp16": 312, "bf16": 312, "fp32": 19.5}}),
    ("A100", {"hbm_gbps": 1555, "tflops": {"fp16": 312, "bf16": 312, "fp32": 19.5}}),
]
PEAK_SOURCE = "NVIDIA datasheets (H100 SXM5/PCIe, H200, A100), dense tensor-core peaks; fp32 without TF32"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What each mode measures. Smoke: tiny shapes and one timed iteration, about 80 s of CPU time.
# (batch, dtype) cases on a GPU: bf16 over the batch sweep, fp16 at the target batch (the two give near-equal
# timings; this keeps a full GPU run near six minutes). A "<key>_cpu" entry replaces "<key>" without CUDA.
FULL = {
    "kernel_case": [(32, "bf16"), (256, "bf16"), (1024, "bf16"), (256, "fp16")],
    "model_case": [(64, "bf16"), (256, "bf16"), (256, "fp16")],
    "model_case_cpu": [(16, "fp32")],
    "compile_batch": 256,
    "compile_batch_cpu": 16,
    "cpu_batch": [16],  # the CPU target on a GPU machine: one case, the CPU is not what that run is for
    "cpu_batch_cpu": [16, 32],
    "text_len": 20,
    "num_objects": 36,
    "hidden": 768,
    "heads": 12,
    "feat_dim": 2048,
    "pretrain_batch": 256,
    "pretrain_batch_cpu": 8,
    "pretrain_steps": 40,
    "pretrain_steps_cpu": 6,
    "pretrain_log_every": 8,
    "pretrain_log_every_cpu": 2,
    "data_images": 300,
    "data_batch": 256,
    "data_batches": 12,
    "data_workers": [0, 1, 4],
    "data_workers_cpu": [0, 1],
    "loop_steps": 30,
    "loop_warmup": 5,
    "loop_workers": 2,
}
# Smoke: tiny shapes and one timed iteration, about 80 s of CPU time.
SMOKE = {
    "kernel_case": [(2, "bf16")],
    "kernel_case_cpu": [(2, "fp32")],
    "model_case": [(2, "bf16")],
    "model_case_cpu": [(2, "fp32")],
    "compile_batch": None,
    "cpu_batch": [2],
    "text_len": 20,
    "num_objects": 36,
    "hidden": 64,
    "heads": 2,
    "feat_dim": 96,
    "pretrain_batch": 4,
    "pretrain_steps": 3,
    "pretrain_log_every": 1,
    "data_images": 6,
    "data_batch": 4,
    "data_batches": 2,
    "data_workers": [0],
    "loop_steps": 3,
    "loop_warmup": 2,
    "loop_workers": 1,
}


def shape(table, key, cuda):
    return table.get(f"{key}_cpu", table[key]) if not cuda else table[key]


def pytest_addoption(parser):
    # pytest's parser has allow_abbrev=False, so --benchmark never abbreviates pytest-benchmark's --benchmark-*.
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        dest="lxmert_full_benchmark",
        help="lxmert_fast: run the full benchmark suite (default: quick smoke mode that only checks the harness)",
    )
    parser.addoption(
        "--benchmark-results-dir",
        default=None,
        dest="lxmert_results_dir",
        help="lxmert_fast: the folder the results file goes to (default: benchmarks/results/ with --benchmark, a "
        "temporary folder in smoke mode)",
    )


def pytest_generate_tests(metafunc):
    """Parametrise the (batch, dtype) cases of the benchmark tests from the mode's table."""
    if not str(metafunc.definition.path).startswith(str(HERE)):
        return
    table = FULL if metafunc.config.getoption("lxmert_full_benchmark") else SMOKE
    cuda = torch.cuda.is_available()
    for arg in ("kernel_case", "model_case"):
        if arg in metafunc.fixturenames:
            metafunc.parametrize(arg, shape(table, arg, cuda), ids=lambda c: f"B{c[0]}-{c[1]}")
    if "cpu_batch" in metafunc.fixturenames:
        metafunc.parametrize("cpu_batch", shape(table, "cpu_batch", cuda), ids=lambda b: f"B{b}")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores)"


def device_peaks(name: str):
    for key, peaks in DEVICE_PEAKS:
        if key in name:
            return peaks
    return None


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Bench:
    """Session state: mode, device, timers and the records that become the results file."""

    def __init__(self, full: bool, out_dir: Path):
        self.full = full
        self.shapes = FULL if full else SMOKE
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        name = device_name()
        self.device_info = {
            "name": name,
            "slug": slugify(name),
            "type": self.device.type,
            "peaks": device_peaks(name) if self.cuda else None,
            "peak_source": PEAK_SOURCE if self.cuda and device_peaks(name) else None,
        }
        self.records = []
        self.started = datetime.datetime.now(datetime.timezone.utc)
        stamp = self.started.strftime("%Y-%m-%d")
        self.path = out_dir / f"{self.device_info['slug']}-{stamp}.json"
        if self.path.exists():  # never overwrite an earlier run of the same day: each file is one run
            self.path = out_dir / f"{self.device_info['slug']}-{self.started.strftime('%Y-%m-%d-%H%M%S')}.json"

    # -- timing --------------------------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, prepare=None, graph=True, iters=None):
        """Milliseconds per call of ``fn`` (or of the callable that ``prepare()`` returns, e.g. a backward pass over
        a forward that ``prepare`` ran). Returns (ms, timer name)."""
        if not self.full:
            fn = prepare() if prepare is not None else fn
            fn()  # warm-up: the first call compiles / autotunes
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            return (time.perf_counter() - t0) * 1e3, "wall-clock, 1 iteration"
        if not self.cuda:
            fn = prepare() if prepare is not None else fn
            fn()
            times = []
            for _ in range(iters or 5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3, f"wall-clock median of {len(times)}"
        if graph:
            try:
                return _cuda_graph_ms(fn, prepare), "CUDA graph replay"
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to plain calls
                torch.cuda.synchronize()
                graph_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        else:
            graph_error = None
        ms = _cuda_event_ms(prepare() if prepare is not None else fn, iters)
        return ms, "CUDA events, median" + (f" (graph capture failed: {graph_error})" if graph_error else "")

    def child_env(self, **extra):
        """Environment for subprocesses: ours less the interpreter switch this file set (a child run on the CPU
        should pick its backend as a user's run would)."""
        env = {**os.environ, **extra}
        if INTERPRETER_SET_HERE:
            env.pop("TRITON_INTERPRET", None)
        return env

    def shape(self, key):
        """A value of the mode's table, the CPU variant where there is one and no CUDA."""
        return shape(self.shapes, key, self.cuda)

    def dtype(self, name):
        return DTYPES[name]

    # -- records -------------------------------------------------------------------------------------------------
    def peak_tflops(self, dtype_name):
        peaks = self.device_info["peaks"]
        return peaks["tflops"].get(dtype_name) if peaks else None

    def record(self, suite, case, impl, ms, role, *, flops=None, nbytes=None, dtype=None, params=None, **extra):
        """Store one measurement; derived rates use only what was measured plus the datasheet peaks."""
        rec = {
            "suite": suite,
            "case": case,
            "impl": impl,
            "role": role,
            "dtype": dtype,
            "params": params or {},
            "ms": ms,
        }
        if flops is not None and ms:
            rec["tflops"] = flops / (ms * 1e-3) / 1e12
        if nbytes is not None and ms:
            rec["gbps"] = nbytes / (ms * 1e-3) / 1e9
        peaks = self.device_info["peaks"]
        if peaks and ms and (flops is not None or nbytes is not None):
            bound = 0.0
            if flops is not None and self.peak_tflops(dtype):
                bound = max(bound, flops / (self.peak_tflops(dtype) * 1e12))
            if nbytes is not None:
                bound = max(bound, nbytes / (peaks["hbm_gbps"] * 1e9))
            rec["roofline_ms"] = bound * 1e3
            rec["roofline_fraction"] = bound * 1e3 / ms
            if nbytes is not None:  # repeated calls on the same inputs then run from L2, not HBM
                l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0)
                rec["fits_in_l2"] = bool(l2) and nbytes < l2
        rec.update(extra)
        self.records.append(rec)
        return rec

    def finish_case(self, suite, case, benchmark=None):
        """Speed-ups of every 'ours' record of a case over each baseline record of the same case."""
        recs = [r for r in self.records if r["suite"] == suite and r["case"] == case]
        ours = [r for r in recs if r["role"] == "ours"]
        base = [r for r in recs if r["role"] in ("baseline", "reference")]
        for r in ours:
            r["speedup"] = {b["impl"]: b["ms"] / r["ms"] for b in base if b["ms"] and r["ms"]}
        if benchmark is not None:
            benchmark.extra_info.update({"case": case, "records": recs})
        if self.full:  # rewrite the file after every case: a run stopped part-way keeps what it measured
            self.write()
        return recs

    def document(self):
        return report.make_document(
            device=self.device_info,
            mode="full" if self.full else "smoke",
            started=self.started.isoformat(timespec="seconds"),
            records=self.records,
            env=environment(),
        )

    def records_of(self, suite, what):
        """This run's records of ``suite``; a suite that measured nothing here skips its harness test, saying why."""
        recs = [r for r in self.records if r["suite"] == suite]
        if not recs:
            pytest.skip(f"no {what} measurements in this run ({what} deselected, skipped or not importable)")
        return recs

    def check_results(self, recs, tmp_path, required_baselines):
        """Write ``recs`` as a results file, read it back and check it: the harness test of every suite."""
        doc = report.make_document(self.device_info, "full" if self.full else "smoke",
                                   self.started.isoformat(timespec="seconds"), recs, environment())
        path = report.write_json(doc, tmp_path / "results.json")
        back = report.load(path)
        assert back == doc
        assert report.validate(back) == []
        for r in back["records"]:
            if r["role"] == "ours":
                assert required_baselines <= set(r["speedup"]), (r["case"], r["impl"], sorted(r["speedup"]))
        written = report.write_report(path)
        assert written[0].read_text().startswith(f"# lxmert_fast benchmarks: {self.device_info['name']}")
        # a run split over two calls (run_on_gpu.sh) is joined with report.py --merge: the same records, in order
        half = len(recs) // 2
        parts = [report.write_json({**doc, "records": part}, tmp_path / f"part{i}.json")
                 for i, part in enumerate((recs[:half], recs[half:]))]
        assert report.main(["--merge", str(tmp_path / "merged.json"), *map(str, parts)]) == 0
        assert report.load(tmp_path / "merged.json")["records"] == back["records"]
        return back

    def write(self, path=None):
        path = Path(path or self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return report.write_json(self.document(), path)


def _cuda_graph_ms(fn, prepare, rep_ms=20.0, replays=7):
    """Time ``fn`` by replaying a CUDA graph of n back-to-back calls, n chosen to fill about ``rep_ms``.

    Everything (including ``prepare``, e.g. the forward whose backward is timed) runs on one side stream, so
    that autograd's backward kernels land on the capturing stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if prepare is not None:
            fn = prepare()
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        n = int(min(max(rep_ms / estimate, 1), 500))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(n):
                fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / n)
    del g
    torch.cuda.synchronize()
    return statistics.median(times)


def _cuda_event_ms(fn, iters=None):
    """Median of per-call CUDA-event times after warm-up calls; n chosen to fill about 200 ms unless given."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate = time.perf_counter() - t0
    n = iters or int(min(max(0.2 / max(estimate, 1e-6), 5), 200))
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def environment():
    import importlib.metadata as md

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("triton", "transformers", "deepspeed", "xformers", "apex"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return env


@pytest.fixture(scope="session")
def bench(request, tmp_path_factory):
    full = request.config.getoption("lxmert_full_benchmark")
    out_dir = request.config.getoption("lxmert_results_dir")
    if out_dir is None:
        out_dir = RESULTS_DIR if full else tmp_path_factory.mktemp("bench_results")
    b = Bench(full, Path(out_dir))
    yield b
    if b.records:
        path = b.write()
        report.write_report(path)
        print(f"\nbenchmark results: {path}")


@pytest.fixture
def shapes(bench):
    return bench.shapes
