"""The Triton kernels compile for an H100 (sm_90) on this CPU-only machine, at the launch configurations the ops
choose for LXMERT's shapes, and none spills more than 256 bytes of registers per thread.

The interpreter that runs the kernels in the other tests never compiles them. This catches a kernel that fails to
lower for a GPU, or a launch configuration that runs out of registers, before a GPU run does
(``benchmarks/kernel_resources.py --check``; Triton ships the ptxas it needs).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KERNELS = {"_add_layernorm_fwd_kernel", "_add_layernorm_bwd_kernel", "_cross_attn_fwd_kernel", "_cross_attn_bwd_kernel",
           "_roi_embedding_fwd_kernel", "_roi_embedding_bwd_kernel"}


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spilling():
    if not any((NVIDIA_BIN / name).exists() for name in ("ptxas-blackwell", "ptxas")):
        pytest.skip(f"this Triton build ships no ptxas in {NVIDIA_BIN}: it cannot compile for NVIDIA GPUs")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels cannot compile
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--batch", "8", "--check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if "_kernel |" in line]
    # 3 dtypes x (add_layernorm and cross-attention, fwd and bwd, with and without dropout) + 3 x RoI fwd and bwd
    assert len(rows) == 30, out.stdout
    assert {row[1].split(": ")[-1].strip() for row in rows} == KERNELS
    for row in rows:
        label, warps, registers, spilled = (cell.strip() for cell in row[1:5])
        assert int(warps) in (4, 8, 16) and 0 < int(registers) <= 255 and int(spilled) <= 256, label
