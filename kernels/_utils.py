"""Launch helpers shared by the fused ops: block sizes, grid sizes, dropout seeds.

Kernels run compiled on CUDA and under Triton's interpreter (TRITON_INTERPRET=1) on CPU; the helpers below keep the
launch decisions identical in both places except for the number of programs, which follows the device.
"""

import functools
import os

import torch
import triton
import triton.language as tl


def block_size(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= n (and >= minimum): Triton tiles need power-of-two extents."""
    return max(triton.next_power_of_2(n), minimum)


def num_programs(device: torch.device, per_sm: int = 4) -> int:
    """How many persistent programs to launch: a few per SM on CUDA, a couple under the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    return 2


def dropout_seed(seed: int | None, device: torch.device) -> torch.Tensor:
    """The Philox seed of one dropout call as a (1,) int64 tensor on ``device``, which the kernels load.

    ``seed=None`` draws it with torch's generator of that device (so torch.manual_seed makes runs repeatable). Being
    a device tensor, it needs no synchronisation, and under CUDA-graph capture the draw is part of the graph: every
    replay gets a fresh mask (a Python int would be frozen into the graph).
    """
    if seed is None:
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def seed_slot(seed: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """What a kernel's Seed pointer gets: the seed tensor, or without dropout any tensor (``like``), never read."""
    return like if seed is None else seed


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> contiguous (rows, N)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def interpreted() -> bool:
    """True when kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def direct(kernel):
    """Eager launch: the Triton kernel itself. (wrap_triton is what makes a launch visible to torch.compile.)"""
    return kernel


def pick(op, impl):
    """The registered custom op while torch.compile traces; otherwise ``impl`` launching its kernels directly.

    Measured on an H100 host (torch 2.11, Triton 3.6, add_layernorm forward at 9216 x 768): a direct launch costs
    30 us of CPU time, the same launch through the triton_op dispatcher 115 us, wrap_triton outside a trace 305 us;
    the kernel itself runs 17 us. Eager calls therefore skip the dispatcher. Even so, at LXMERT sizes eager calls are
    bound by Triton's Python launch path (there: about 550 us of CPU per add_layernorm forward + backward against
    60 us of GPU time), so time and train with CUDA graphs or torch.compile.
    """
    if torch.compiler.is_compiling():
        return op
    return functools.partial(impl, direct)


@triton.jit
def row_tile(start, end, cols, col_ok, N, BLOCK_M: tl.constexpr):
    """Rows ``start`` .. ``start + BLOCK_M`` (those below ``end``) of a row-major (M, N) matrix: the row indices,
    their mask, the 2-D mask with ``col_ok`` and the element offsets (BLOCK_M, BLOCK_N)."""
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    return rows, row_ok, row_ok[:, None] & col_ok[None, :], rows[:, None] * N + cols[None, :]


@triton.jit
def row_block(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's block of rows of a row-major (M, N) matrix: row and column indices, their masks, the 2-D mask
    and the element offsets (BLOCK_M, BLOCK_N)."""
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows, row_ok, ok, offs = row_tile(tl.program_id(0) * BLOCK_M, M, cols, col_ok, N, BLOCK_M)
    return rows, cols, row_ok, col_ok, ok, offs


@triton.jit
def layernorm_rows(x, ok, N, eps):
    """(x - mean) * rstd over the valid part of each row of a (BLOCK_M, BLOCK_N) fp32 tile, and the fp32
    (mean, rstd) per row; shared by the fused LayerNorm kernels."""
    mean = tl.sum(tl.where(ok, x, 0.0), axis=1) / N
    diff = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
    return diff * rstd[:, None], mean, rstd


@triton.jit
def dropout_scale(dropout_p):
    """1 / (1 - p) as fp32. torch.compile passes float arguments as fp64; dividing a tile by (1 - p) directly would
    promote the whole tile (and the loop-carried sums) to fp64."""
    return tl.cast(1.0 / (1.0 - dropout_p), tl.float32)
