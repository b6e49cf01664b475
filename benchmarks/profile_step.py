"""Time one pre-training step of LxmertForPreTraining in several execution modes, and show where the GPU time goes.

    python benchmarks/profile_step.py --batch 256 --dtype bf16                       # every variant, then a profile
    python benchmarks/profile_step.py --variants triton:graphed,transformers:eager --profile ""

A variant is IMPL:MODE. IMPL: ``torch`` or ``triton`` (lxmert_fast's backends) or ``transformers``. MODE:

- ``eager``: forward, backward, fused AdamW step, launched op by op (the way bench_model.py times a step; ours
  as pretrain.py trains, with bench_model.our_extras: the LM head at the masked tokens only and the text padding
  skipped, also when compiled or graphed; the same loss);
- ``graphed``: the same step captured once in a CUDA graph and replayed (lxmert_fast.train.cuda_graphs.GraphedStep);
- ``compiled``: ``torch.compile(model)``, launched eagerly; ``compiled+graphed``: both.

Every variant loads the same weights and trains on the same batch (bench_model.make_batch: captions of 8-20 tokens
padded to 20, 36 objects). The profile lists the GPU kernels of one eager step of ``--profile`` by total time: their
sum is what a step costs once launch overhead is gone. Results are printed as a markdown table and, with ``--out``,
written as JSON. GPU only.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402 - benchmarks/ is not a package

from lxmert_fast.model.flops import pretraining_flops_per_sample  # noqa: E402

DEFAULT_VARIANTS = (
    "transformers:eager,torch:eager,triton:eager,torch:graphed,triton:graphed,transformers:graphed,"
    "torch:compiled,torch:compiled+graphed,triton:compiled+graphed"
)
PEAK_TFLOPS = {"bf16": 989.4, "fp16": 989.4}  # H100 SXM dense tensor-core peak, for MFU


def make_step(impl, mode, config, state, batch, dtype):
    """A callable that runs one training step on ``batch`` (bench_model's, so the two files time the same step)."""
    name = "transformers" if impl == "transformers" else f"lxmert_fast[{impl}]"
    model = bench_model.build(name, config, state, "LxmertForPreTraining", torch.device("cuda"))
    return bench_model._train_step(model, batch, dtype, torch.device("cuda"), mode, ours=impl != "transformers")


def time_step(step, steps):
    for _ in range(2):  # warm-up (a graphed step is already captured; a compiled one compiles here)
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    return start.elapsed_time(end) / steps, wall, float(loss.detach())


def profile(step, top):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    lines = [f"GPU kernel time of one step: {total_us / 1e3:.2f} ms in {sum(e.count for e in events)} kernels", "",
             "| kernel | calls | total ms | share |", "|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.3f} | "
                     f"{e.self_device_time_total / max(total_us, 1):.1%} |")
    return "\n".join(lines), total_us / 1e3


def matmul_ceiling(dtype):
    """TFLOP/s of the model's largest GEMM shapes alone: what the step's GEMMs could reach."""
    out = {}
    for m, k, n in ((256 * 36, 768, 3072), (256 * 36, 3072, 768), (256 * 36, 768, 768), (256 * 20, 768, 30522)):
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        b = torch.randn(k, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        torch.cuda.synchronize()
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n / (start.elapsed_time(end) / 20 * 1e-3) / 1e12, 1)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--profile", default="triton:eager,torch:eager", help="IMPL:eager variants to profile")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per profile")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs a CUDA GPU")

    from lxmert_fast import LxmertConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = LxmertConfig()
    state = bench_model.reference_state(config, "LxmertForPreTraining")
    batch = bench_model.make_batch(config, args.batch, 20, 36, torch.device("cuda"))
    flops = pretraining_flops_per_sample(config, 20, 36, lm_head="masked") * args.batch
    results = {"device": torch.cuda.get_device_name(), "batch": args.batch, "dtype": args.dtype,
               "torch": torch.__version__, "gemm_tflops": matmul_ceiling(dtype), "variants": {}, "profiles": {}}
    print(f"{results['device']}, batch {args.batch}, {args.dtype}; GEMM ceilings (TFLOP/s): {results['gemm_tflops']}")
    lines = ["| variant | ms/step (events) | ms/step (wall) | samples/s | MFU | loss |", "|---|---|---|---|---|---|"]
    for variant in [v for v in args.variants.split(",") if v]:
        impl, mode = variant.split(":")
        t0 = time.perf_counter()
        try:
            step = make_step(impl, mode, config, state, batch, dtype)
            ms, wall, loss = time_step(step, args.steps)
            mfu = flops / (ms * 1e-3) / (PEAK_TFLOPS[args.dtype] * 1e12)
            rec = {"ms": round(ms, 2), "wall_ms": round(wall, 2), "samples_per_s": round(args.batch / ms * 1e3, 1),
                   "mfu": round(mfu, 4), "loss": round(loss, 4), "setup_s": round(time.perf_counter() - t0, 1)}
            lines.append(f"| {variant} | {ms:.2f} | {wall:.2f} | {rec['samples_per_s']:.0f} | {mfu:.1%} | {loss:.4f} |")
        except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the others
            rec = {"failed": f"{type(exc).__name__}: {str(exc)[:400]}"}
            lines.append(f"| {variant} | failed: {rec['failed'][:150]} | | | | |")
        finally:
            step = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        results["variants"][variant] = rec
        print(lines[-1], flush=True)
    for variant in [v for v in args.profile.split(",") if v]:
        impl, mode = variant.split(":")
        step = make_step(impl, mode, config, state, batch, dtype)
        table, total_ms = profile(step, args.top)
        results["profiles"][variant] = {"gpu_kernel_ms": round(total_ms, 2), "table": table}
        print(f"\n## Profile of {variant}\n\n{table}", flush=True)
        step = None
        torch.cuda.empty_cache()
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
