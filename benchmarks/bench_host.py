"""The host side of a pre-training step: what one batch costs to build in a DataLoader worker and to bring into the
main process (issue 22: the GPU step takes 40.7 ms for 256 samples, so the host must deliver 6,300+ samples/s and,
for the 16,000 samples/s target, far more per core).

Ours: the compact batch (lxmert_fast.data.pretrain_batch: each value once, one buffer, built in a reused slot of
shared memory in a worker: batch_ring; compact_pretrain_collate) through the run's loader (train.feed), what
pretrain.py ships. Baselines, same data, same run: the compact batch in a fresh shared-memory segment per batch (a
plain DataLoader), and the dense batch (pretrain_collate: the features twice, float32 masks, a dozen tensors each
copied into fresh shared memory).
Reported per case, through a real torch DataLoader with one worker process:
    bytes_per_sample        the batch's bytes / batch size (target: <= 150 KiB at the release's 2048 features)
    worker_cpu_us_per_sample  the worker process's CPU time (/proc schedstat, all its threads) per sample, steady state
                            (target: <= 100 us)
    main_cpu_ms_per_batch   the main process's CPU time per batch to receive it and let it go (its transport)
``ms`` is the worker's CPU per batch.

And the loop's own cost per optimiser step in the main process (benchmarks/bench_loop.py, the model's compute made
free, each engine in a process of its own): ``ms`` is main-process CPU per step, next to the same loop with a fresh
shared-memory segment per batch (full mode) and the issue's budget of 4 ms (a labelled target, not a measurement).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SUITE = "host"
WORKERS = 1
LOOP_TARGET = "target (issue 22): 4 ms of main-process CPU a step (not measured)"


@pytest.fixture(scope="module")
def dataset(bench, tmp_path_factory):
    from lxmert_fast.data import AnswerTable, FeatureStore, PretrainDataset, ensure_sample_data

    paths = ensure_sample_data(tmp_path_factory.mktemp("host") / "sample_data", num_images=bench.shape("data_images"),
                               feat_dim=bench.shape("feat_dim"))
    store = FeatureStore.from_tsv(paths.features_tsv, progress=False)
    return PretrainDataset(paths.train_json, [store], AnswerTable(paths.answer_table), paths.tokenizer_dir,
                           feature_dtype="float16")


def cpu_seconds(pid):
    """CPU time of all threads of a process so far, in nanoseconds from /proc (schedstat: not clock ticks)."""
    total = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{thread}/schedstat") as f:
            total += int(f.read().split()[0])
    return total * 1e-9


def batch_bytes(batch):
    from lxmert_fast.data import CompactBatch

    if isinstance(batch, CompactBatch):
        return batch.nbytes
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    values = batch.values() if isinstance(batch, dict) else batch
    return sum(batch_bytes(v) for v in values)


class Batches(list):
    """A batch sampler of ``count`` batches of ``micro_batch`` samples, cycling over a permutation."""

    def __init__(self, num_samples, micro_batch, count):
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(0)).tolist()
        super().__init__([order[(i * micro_batch + j) % num_samples] for j in range(micro_batch)]
                         for i in range(count))
        self.micro_batch = micro_batch


def host_costs(dataset, collate, batch, batches, ring=True):
    """(bytes per sample, worker CPU s per batch, main-process CPU s per batch) over ``batches`` after two warm-up
    batches, one worker. ``ring``: the run's loader (feed.training_loader: batches built in a reused BatchRing);
    else a plain DataLoader (a fresh shared-memory segment per batch)."""
    from lxmert_fast.train import feed

    # two warm-up batches, the measured ones, and as many again as the worker may build ahead (its prefetch)
    sampler = Batches(len(dataset), batch, 2 + batches + PREFETCH_ROOM)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if ring:
        loader = feed.training_loader(dataset, sampler, collate, WORKERS, device)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=WORKERS,
                                             pin_memory=device == "cuda")
    it = iter(loader)
    nbytes = batch_bytes(next(it))
    next(it)  # warm-up: worker start, first reads of the feature store
    pids = [w.pid for w in it._workers]
    # the worker builds ahead: start and stop its clock when its queue is full, so that exactly ``batches`` batches
    # are built in between (else a small run may measure none of them)
    worker0, main0 = idle_cpu_seconds(pids), time.process_time()
    for _ in range(batches):
        received = next(it)
        del received  # the main process lets it go: its shared memory is unmapped here
    main1 = time.process_time()
    worker1 = idle_cpu_seconds(pids)
    return nbytes / batch, (worker1 - worker0) / batches, (main1 - main0) / batches


PREFETCH_ROOM = 8  # more than any loader here builds ahead (prefetch_factor x workers)


def idle_cpu_seconds(pids, poll_s=0.02, limit_s=30.0):
    """The processes' CPU seconds once they have stopped using CPU (two equal readings ``poll_s`` apart)."""
    last, deadline = None, time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = sum(cpu_seconds(p) for p in pids)
        if now == last:
            return now
        last = now
        time.sleep(poll_s)
    raise AssertionError(f"the loader's workers kept using CPU for {limit_s} s with nothing asked of them")


def test_host_costs_per_batch(bench, benchmark, dataset):
    from lxmert_fast.data import compact_pretrain_collate, pretrain_collate

    batch, batches = bench.shape("data_batch"), bench.shape("data_batches")
    case = f"host/batch {batch}/{WORKERS} worker"
    impls = {"ours (compact batch, batch ring)": (compact_pretrain_collate, True),
             "compact batch, fresh shared memory": (compact_pretrain_collate, False),
             "dense batch (pretrain_collate)": (pretrain_collate, False)}
    for impl, (collate, ring) in impls.items():
        per_sample, worker_s, main_s = host_costs(dataset, collate, batch, batches, ring)
        bench.record(SUITE, case, impl, worker_s * 1e3, "ours" if impl.startswith("ours") else "baseline",
                     bytes_per_sample=per_sample, worker_cpu_us_per_sample=worker_s / batch * 1e6,
                     main_cpu_ms_per_batch=main_s * 1e3, timer=f"worker CPU (/proc schedstat) over {batches} batches",
                     params={"batch": batch, "workers": WORKERS, "feat_dim": dataset.feat_dim})
    recs = bench.finish_case(SUITE, case)
    ours = next(r for r in recs if r["role"] == "ours")
    dense = next(r for r in recs if r["impl"].startswith("dense"))
    assert ours["bytes_per_sample"] < dense["bytes_per_sample"]
    benchmark.extra_info.update({"records": recs})
    benchmark.pedantic(lambda: host_costs(dataset, compact_pretrain_collate, batch, 1), rounds=1, iterations=1)


def run_loop(bench, tmp_path, engine, fresh_memory):
    """benchmarks/bench_loop.py in a process of its own (DeepSpeed and the process group stay out of this one)."""
    batch, steps = bench.shape("data_batch"), bench.shape("loop_steps")
    cmd = [sys.executable, str(Path(__file__).with_name("bench_loop.py")), "--engine", engine, "--batch", str(batch),
           "--steps", str(steps), "--warmup", str(bench.shape("loop_warmup")), "--workers",
           str(bench.shape("loop_workers")), "--images", str(bench.shape("data_images")), "--feat-dim",
           str(bench.shape("feat_dim")), "--data-dir", str(tmp_path.parent / f"loop_data_{bench.shape('feat_dim')}")]
    cmd += ["--fresh-memory"] if fresh_memory else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=bench.child_env(TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(sys.path)))
    if proc.returncode != 0:
        pytest.fail(f"bench_loop.py exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_loop_cost_per_step(bench, benchmark, tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    case = f"host/loop per step, --engine {engine}/batch {bench.shape('data_batch')}"
    variants = {"ours (batch ring)": False, "fresh shared memory per batch": True} if bench.full else {
        "ours (batch ring)": False}
    for impl, fresh in variants.items():
        out = run_loop(bench, tmp_path, engine, fresh)
        bench.record(SUITE, case, impl, out["main_cpu_ms_per_step"], "baseline" if fresh else "ours",
                     main_cpu_ms_per_step=out["main_cpu_ms_per_step"], wall_ms_per_step=out["wall_ms_per_step"],
                     timer="main-process CPU (time.process_time) per optimiser step, model compute free",
                     params={k: out[k] for k in ("engine", "batch", "workers", "feat_dim", "steps", "commit")})
    bench.record(SUITE, case, LOOP_TARGET, 4.0, "reference")
    recs = bench.finish_case(SUITE, case)
    ours = next(r for r in recs if r["role"] == "ours")
    assert ours["main_cpu_ms_per_step"] > 0
    benchmark.extra_info.update({"records": recs})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the time is the subprocess's, recorded above


def test_host_results_well_formed(bench, tmp_path):
    recs = bench.records_of(SUITE, "host-side")
    back = bench.check_results([r for r in recs if "/loop per step" not in r["case"]], tmp_path,
                               {"dense batch (pretrain_collate)", "compact batch, fresh shared memory"})
    assert all(r["speedup"] for r in back["records"] if r["role"] == "ours")
    loop = [r for r in recs if "/loop per step" in r["case"]]
    if loop:
        (tmp_path / "loop").mkdir()
        back = bench.check_results(loop, tmp_path / "loop", {LOOP_TARGET})
        assert all(r["speedup"][LOOP_TARGET] > 0 for r in back["records"] if r["role"] == "ours")
