"""How training batches reach the step: one DataLoader for the whole run, and the next batch moved to the device
while the current step runs.

- ``EpochBatches``: the batch sampler of that DataLoader. Its workers persist across epochs (no fork and no warm-up
  per epoch), so they never see the main process's ``set_epoch``: the sampler carries the epoch instead, as
  (epoch, index) keys for a dataset whose draws depend on it (PretrainDataset), and gives exactly the batches of
  ``sampling.epoch_batches``, so the data order is the one of a loader made per epoch.
- ``DevicePrefetch``: on a GPU, the objective's preparation of batch k + 1 (its copy from pinned memory and its
  expansion on the device) is queued on a side stream while step k runs; the step's stream waits for it on the
  device, not on the host. Elsewhere the batches are prepared one by one, as they come.

The workers build their batches in reused shared memory (lxmert_fast.data.batch_ring) when the dataset gives a
batch's size. The loader pins memory only when the engine's device is a GPU: the pinning copy is wasted work for a
CPU engine.
"""

from __future__ import annotations

import collections

import torch

from lxmert_fast.data.batch_ring import BatchRing
from lxmert_fast.train import sampling

PREFETCH_PER_WORKER = 4  # batches each worker keeps ready: rides over one slow batch without starving the step
HELD_BY_LOOP = 3  # batches the main process may hold besides those: the step's, the prefetched one, one in pinning


class EpochBatches(torch.utils.data.Sampler):
    """One rank's micro-batches of the epoch set by ``set_epoch`` (sampling.epoch_batches), from a micro-batch on;
    keyed by (epoch, index) when ``keyed`` (the dataset's items depend on the epoch)."""

    def __init__(self, num_samples, micro_batch, seed, rank, world, keyed):
        self.num_samples, self.micro_batch, self.seed, self.rank, self.world = (num_samples, micro_batch, seed,
                                                                                rank, world)
        self.keyed = keyed
        self.epoch, self.start, self.stop = 0, 0, 0

    def set_epoch(self, epoch, start, stop):
        """The micro-batches ``start`` to ``stop`` (exclusive) of ``epoch`` are the next iteration's."""
        self.epoch, self.start, self.stop = int(epoch), int(start), int(stop)

    def __iter__(self):
        batches = sampling.epoch_batches(self.num_samples, self.micro_batch, self.seed, self.epoch, self.rank,
                                         self.world, start=self.start)[: self.stop - self.start]
        for batch in batches:
            yield [(self.epoch, i) for i in batch] if self.keyed else batch

    def __len__(self):
        return max(min(self.stop, sampling.num_micro_batches(self.num_samples, self.micro_batch, self.world))
                   - self.start, 0)


def training_loader(dataset, batches: EpochBatches, collate, num_workers, device) -> torch.utils.data.DataLoader:
    """The run's one training DataLoader: persistent workers, ``PREFETCH_PER_WORKER`` batches ahead each, built in
    reused shared memory (a BatchRing) when the dataset says how large a batch is (``slot_bytes``), memory pinned
    only for a GPU."""
    workers, cuda = int(num_workers), torch.device(device).type == "cuda"
    ring = None
    if workers > 0 and callable(getattr(dataset, "slot_bytes", None)):
        ring = BatchRing(workers, PREFETCH_PER_WORKER + HELD_BY_LOOP, dataset.slot_bytes(batches.micro_batch))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                         persistent_workers=workers > 0,
                                         prefetch_factor=PREFETCH_PER_WORKER if workers > 0 else None,
                                         worker_init_fn=ring.attach if ring is not None else None, pin_memory=cuda)
    loader.batch_ring = ring  # DevicePrefetch pins it once the workers have started
    return loader


def epoch_keyed(dataset) -> bool:
    """Whether ``dataset`` draws its items per epoch (``set_epoch``) and so must be indexed by (epoch, index)."""
    return callable(getattr(dataset, "set_epoch", None))


class DevicePrefetch:
    """Iterates ``prepare(host_batch)`` over ``host_batches``; on a CUDA ``device`` one batch ahead, on a side
    stream. ``prepare`` returns what the step consumes (tensors nested in dicts, tuples and lists, and flags)."""

    def __init__(self, host_batches, prepare, device):
        self.host_batches, self.prepare = host_batches, prepare
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.in_flight = InFlight()

    def __iter__(self):
        if self.stream is None:
            for batch in self.host_batches:
                yield self.prepare(batch)
            return
        pending, batches = None, iter(self.host_batches)  # a DataLoader's workers start here
        ring = getattr(self.host_batches, "batch_ring", None)
        if ring is not None and not ring.pinned:
            ring.pin()  # its batches need no pinning copy; in_flight keeps each until it is copied
        try:
            for batch in batches:
                ready = self._queue(batch)
                if pending is not None:
                    yield self._take(pending)
                pending = ready
            if pending is not None:
                yield self._take(pending)
        finally:
            self.in_flight.wait()  # a loop that stops early lets no host batch go while it is being copied

    def _queue(self, batch):
        """Queue the batch's preparation on the side stream, after what the step's stream has queued so far (its
        buffers may be ones the allocator handed back from a finished step). The host batch is kept until its
        copies are done: in pinned memory that is not torch's own (a pinned batch_ring), nothing else keeps it."""
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            prepared = self.prepare(batch)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.in_flight.add(batch, done)
        return prepared, done

    def _take(self, pending):
        prepared, done = pending
        step_stream = torch.cuda.current_stream(self.stream.device)
        step_stream.wait_event(done)
        _record_stream(prepared, step_stream)  # freed after the step's use, not after the side stream's
        return prepared


class InFlight:
    """Host batches whose copies to the device were queued, each kept until its event has completed."""

    def __init__(self):
        self.batches = collections.deque()  # (host batch, event), in the order queued

    def add(self, batch, event) -> None:
        self.batches.append((batch, event))
        while self.batches and self.batches[0][1].query():  # done: the oldest go (a query does not wait)
            self.batches.popleft()

    def wait(self) -> None:
        while self.batches:
            self.batches.popleft()[1].synchronize()


def _record_stream(value, stream):
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            value.record_stream(stream)
    elif isinstance(value, dict):
        for v in value.values():
            _record_stream(v, stream)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _record_stream(v, stream)
