"""Which samples each rank reads, and in what order: training epochs (resumable from a micro-batch, the same global
batches for any number of ranks) and evaluation passes. The run's step plan is built on them (loop.plan_steps)."""

import torch


def epoch_batches(num_samples, micro_batch, seed, epoch, rank_, world, start=0):
    """The micro-batches (lists of sample indices) of one rank in one epoch, from micro-batch ``start`` on.

    A permutation that depends only on (seed, epoch), cut into global batches of ``micro_batch * world`` samples;
    rank r takes every world-th sample, so the union of the ranks' k-th micro-batches is the same set of samples
    for any world size with the same global batch. The incomplete tail is dropped so all ranks step together.
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order = torch.randperm(num_samples, generator=g).tolist()
    per_global = micro_batch * world
    n_batches = num_samples // per_global
    return [order[k * per_global + rank_ : (k + 1) * per_global : world] for k in range(start, n_batches)]


def num_micro_batches(num_samples, micro_batch, world):
    return num_samples // (micro_batch * world)


def eval_batches(num_samples, micro_batch, rank_, world, limit=None, seed=None):
    """One rank's evaluation micro-batches over all ``num_samples`` (the last one partial, never dropped), in a fixed
    order (shuffled by ``seed`` when given), at most ``limit`` per rank. Every rank gets as many batches (ZeRO-3
    gathers parameters in every forward): a rank short of samples repeats the first ones."""
    order = list(range(num_samples))
    if seed is not None:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed))).tolist()
    padded = order + order[: -num_samples % world] if num_samples else []
    mine = padded[rank_::world]
    batches = [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
    return batches if limit is None else batches[:limit]
