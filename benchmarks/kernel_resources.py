"""Compile every Triton kernel for a GPU without having one, and report what each launch costs the GPU's SMs.

    python benchmarks/kernel_resources.py                 # sm_90 (H100/H200), LXMERT shapes, a table
    python benchmarks/kernel_resources.py --check         # exit 1 on a failed compile or > 256 spilled bytes/thread
    python benchmarks/kernel_resources.py --arch 80       # another architecture (A100)

The interpreter that runs the kernels on a CPU never compiles them, so it cannot see a kernel that fails to lower
for a GPU or one that needs more registers than a thread has. This script runs each launcher exactly as the ops do,
catches the launch instead of running it, and hands the same arguments to Triton's compiler for the chosen target
(Triton ships its own ptxas; no GPU or CUDA driver is needed). Per launch it reports registers per thread, spilled
bytes and shared memory, and from them how many programs fit on one SM at once: the occupancy that decides how
well a memory-bound kernel hides its latency. These are static facts of the compiled code, not timings.

Runs only without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled).
"""

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Hopper and Ampere SM limits (CUDA programming guide, "Compute capabilities"): registers and threads per SM, the
# register allocation unit per warp, and the shared memory a block may use.
SM_LIMITS = {
    90: dict(registers=65536, threads=2048, max_blocks=32, shared=227 * 1024),
    80: dict(registers=65536, threads=2048, max_blocks=32, shared=163 * 1024),
}
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)

POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                 torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}


@dataclass
class Launch:
    """One kernel launch as an op would make it: the kernel, its arguments and launch options."""

    label: str
    kernel: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for ``wrap`` in the ops' launchers: ``wrap(kernel)[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, label):
        self.label, self.launches = label, []

    def __call__(self, kernel):
        def launch(*args, **kwargs):
            self.launches.append(Launch(f"{self.label}: {kernel.fn.__name__}", kernel, args, kwargs))

        return _Grid(launch)


class _Grid:
    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


def _signature(kernel, args, kwargs):
    """Triton's signature, constants and 16-byte alignment hints for these arguments, close to what its own
    launcher derives (which also turns an int equal to 1 into a constant: not done here)."""
    names = kernel.arg_names
    bound = dict(zip(names, args, strict=False))  # the rest come as keywords
    bound.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    constexpr = {p.name for p in kernel.params if p.is_constexpr}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if name in constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]] if value.data_ptr() % 16 == 0 else []
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            attrs[(i,)] = [["tt.divisibility", 16]] if value % 16 == 0 else []
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {name} has unsupported type {type(value).__name__}")
    return signature, constants, attrs, options


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spilled bytes and static shared memory of compiled PTX, from ``ptxas -v`` (Triton's own ptxas)."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # Triton may emit a newer PTX version than its plain ptxas reads; the newer ptxas it ships reads both
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              str(src), "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()[-500:]}")
    text = out.stderr + out.stdout
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return {"registers": registers, "spill_bytes": spills}


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one recorded launch for ``arch`` and return its resources and how many programs fit on one SM."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs, options = _signature(launch.kernel, launch.args, launch.kwargs)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constants, attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    report = _ptxas_report(compiled.asm["ptx"], arch)
    limits = SM_LIMITS[arch]
    per_warp = -(-report["registers"] * 32 // REGISTER_UNIT) * REGISTER_UNIT
    fits = min(limits["registers"] // (per_warp * warps), limits["threads"] // (32 * warps), limits["max_blocks"],
               limits["shared"] // shared if shared else limits["max_blocks"])
    return dict(report, warps=warps, shared_bytes=shared, programs_per_sm=fits, warps_per_sm=fits * warps)


def lxmert_launches(batch=256, text_len=20, num_objects=36, hidden=768, heads=12, feat_dim=2048,
                    dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """The launches the three fused ops make at LXMERT's shapes, forward and backward, with and without dropout, in
    bf16, fp16 and fp32. The public ops run end to end on the CPU with every kernel launch recorded instead of made
    (their outputs stay uninitialised), so the arguments are exactly the ones a GPU would get."""
    k = importlib.import_module("lxmert_fast.kernels.ops")
    utils = importlib.import_module("lxmert_fast.kernels._utils")
    rows, d = batch * num_objects, hidden // heads
    launches = []

    def record(label, op, *args, **kwargs):
        """Run ``op`` forward and backward with its launches recorded."""
        recorder, direct = _Recorder(label), utils.direct
        utils.direct = recorder  # what the ops' eager path launches through (see _utils.pick)
        try:
            out = op(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])
        finally:
            utils.direct = direct
        launches.extend(recorder.launches)

    def param(*shape, dtype):
        return torch.zeros(*shape, dtype=dtype, requires_grad=True)

    for dtype in dtypes:
        name = POINTER_TYPES[dtype]
        for p in (0.0, 0.1):
            x, r = param(rows, hidden, dtype=dtype), param(rows, hidden, dtype=dtype)
            w, b = param(hidden, dtype=dtype), param(hidden, dtype=dtype)
            record(f"add_layernorm {name} p={p}", k.add_layernorm, x, r, w, b, dropout_p=p, training=True)
            lang = [param(batch, text_len, heads, d, dtype=dtype).transpose(1, 2) for _ in range(3)]
            visn = [param(batch, num_objects, heads, d, dtype=dtype).transpose(1, 2) for _ in range(3)]
            lang_mask = torch.ones(batch, text_len, dtype=torch.bool)
            record(f"cross_attention {name} p={p}", k.bidirectional_cross_attention, *lang, *visn, lang_mask, None,
                   dropout_p=p)
        feats = torch.zeros(rows, feat_dim, dtype=dtype)  # the F -> hidden GEMM before the kernel runs on the CPU
        boxes = param(rows, 4, dtype=dtype)
        weights = [param(hidden, feat_dim, dtype=dtype), param(hidden, dtype=dtype), param(hidden, dtype=dtype),
                   param(hidden, dtype=dtype), param(hidden, 4, dtype=dtype), param(hidden, dtype=dtype),
                   param(hidden, dtype=dtype), param(hidden, dtype=dtype)]
        record(f"roi_position_embedding {name}", k.roi_position_embedding, feats, boxes, *weights)
    return launches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS), help="compute capability x 10")
    parser.add_argument("--batch", type=int, default=256, help="sets grid sizes only: the compiled code is the same")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated, of bf16, fp16, fp32")
    parser.add_argument("--check", action="store_true", help="exit 1 on a failed compile or a spill over --max-spill")
    # a few hundred bytes per thread stay in L1; the worst launch kept (fp32 backward with dropout) spills 188
    parser.add_argument("--max-spill", type=int, default=256, help="spilled bytes per thread tolerated (default 256)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled")
    bad = []
    print(f"Triton kernels compiled for sm_{args.arch} (static: registers/thread, spills, shared memory, "
          f"programs and warps resident per SM), LXMERT shapes at batch {args.batch}, hidden {args.hidden}")
    print("| launch | warps | registers | spilled bytes | shared KiB | programs/SM | warps/SM |")
    print("|---|---|---|---|---|---|---|")
    by_name = {v: k for k, v in POINTER_TYPES.items() if k.is_floating_point}
    dtypes = [by_name[d] for d in args.dtypes.split(",")]
    for launch in lxmert_launches(batch=args.batch, hidden=args.hidden, heads=args.heads, dtypes=dtypes):
        try:
            r = compile_launch(launch, args.arch)
        except Exception as exc:  # noqa: BLE001 - report every launch, then fail
            bad.append(f"{launch.label}: {type(exc).__name__}: {str(exc).strip()[:300]}")
            print(f"| {launch.label} | compile FAILED: {type(exc).__name__} | | | | | |", flush=True)
            continue
        if r["spill_bytes"] > args.max_spill:
            bad.append(f"{launch.label}: {r['spill_bytes']} bytes of registers spilled (over {args.max_spill})")
        print(f"| {launch.label} | {r['warps']} | {r['registers']} | {r['spill_bytes']} | "
              f"{r['shared_bytes'] / 1024:.1f} | {r['programs_per_sm']} | {r['warps_per_sm']} |", flush=True)
    for line in bad:
        print("PROBLEM:", line, file=sys.stderr)
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
