"""Reused shared memory for the batches that DataLoader workers send: a few slots per worker, made once.

A fresh shared-memory segment per batch (torch's default for a tensor a worker sends) costs the worker the zeroing
and faulting-in of every page of it (about 9,000 pages for a 37 MB batch at B = 256), and the main process a socket
round trip for its file descriptor, a map, and unmapping and freeing the pages when the batch goes (issue 22). A
slot of a ring is mapped once in every process, before the workers start, and what crosses the worker's queue is its
number.

A slot is free (0) or in use (1), in a small shared flag array. Worker w claims the first free one of its own slots
(no two processes ever claim the same slot) and builds a batch in it; sending the batch hands the slot to the main
process. The process that owns a slot frees it when the last tensor viewing it is gone: the main process once the
step, the device copy or the pinning is done with the batch; a worker when the batch was not sent (e.g. expanded
into a dense batch there). A worker whose slots are all in use, or a batch larger than a slot, gets a fresh segment
as before: the ring never blocks, and never changes what a batch holds.

Public API
    BatchRing(workers, slots_per_worker, slot_bytes)   made in the main process before the workers start
        .attach(worker_id)       the DataLoader's worker_init_fn: this worker builds its batches in the ring
        .pin(), .pinned          page-locked for CUDA copies, after the fork (no pinning copy; async copies)
        .in_use() -> int         slots in use now (tests)
    claim(nbytes) -> (buffer, Slot) | None     in a worker with a ring: a uint8 tensor of nbytes in a free slot
    Slot.sent() -> receive args  the slot changes hands (called when the batch is pickled); receive(*args) rebuilds
                                 the buffer in the main process
"""

from __future__ import annotations

import itertools
import os
import weakref

import torch

_PAGE = 4096
_RINGS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # token -> ring, in every process
_NEXT = itertools.count()
_ATTACHED: BatchRing | None = None  # the ring of this worker process


class BatchRing:
    """``slots_per_worker`` slots of ``slot_bytes`` for each of ``workers`` workers, in one shared segment."""

    def __init__(self, workers: int, slots_per_worker: int, slot_bytes: int):
        self.workers, self.slots_per_worker = int(workers), int(slots_per_worker)
        self.pinned = False
        self.slot_bytes = -(-int(slot_bytes) // _PAGE) * _PAGE
        slots = self.workers * self.slots_per_worker
        # untouched pages take no memory: only the slots that batches were built in count
        self.memory = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(slots * self.slot_bytes))
        self.flags = torch.zeros(slots, dtype=torch.uint8).share_memory_()
        self.token = (os.getpid(), next(_NEXT))
        self._register()

    def _register(self):
        self._memory_np, self._flags_np = self.memory.numpy(), self.flags.numpy()
        _RINGS[self.token] = self

    def __getstate__(self):  # a spawned worker gets the same shared memory (torch passes it by file descriptor)
        return {"workers": self.workers, "slots_per_worker": self.slots_per_worker, "slot_bytes": self.slot_bytes,
                "memory": self.memory, "flags": self.flags, "token": self.token, "pinned": False}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._register()

    def pin(self) -> None:
        """Page-lock the ring for CUDA copies, in the process that copies to the device, once its workers have
        forked (CUDA may keep pinned pages out of a forked child); every page is then resident: the ring's whole
        size. A batch in it needs no pinned copy, and its copy to the device runs asynchronously: the caller keeps
        the batch until that copy is done (train.feed.DevicePrefetch does)."""
        size = self.memory.numel()
        error = int(torch.cuda.cudart().cudaHostRegister(self.memory.data_ptr(), size, 1))  # 1: portable
        if error:  # as torch's own pinning of shared memory (torch.cuda._pin_memory_utils): an error, not a warning
            raise RuntimeError(f"CUDA could not page-lock the batch ring ({size / 2**20:.0f} MiB for "
                               f"{self.workers} DataLoader workers; cudaError {error}): use fewer --num-workers")
        self.pinned = True
        # unregistered when the last view of the memory is gone, before it is unmapped
        weakref.finalize(self.memory, torch.cuda.cudart().cudaHostUnregister, self.memory.data_ptr())

    def attach(self, worker_id: int) -> None:
        global _ATTACHED
        _ATTACHED = self

    def in_use(self) -> int:
        return int(self._flags_np.sum())

    def _claim(self, worker: int, nbytes: int):
        if nbytes > self.slot_bytes or not 0 <= worker < self.workers:
            return None
        first = worker * self.slots_per_worker
        for slot in range(first, first + self.slots_per_worker):
            if self._flags_np[slot] == 0:
                self._flags_np[slot] = 1
                return self._buffer(slot, nbytes)
        return None

    def _buffer(self, slot: int, nbytes: int):
        """A tensor viewing the slot's first ``nbytes``, and the Slot that frees it when the last view of it goes."""
        start = slot * self.slot_bytes
        view = self._memory_np[start : start + nbytes]  # torch.from_numpy keeps this object until its last view
        owner = Slot(self, slot, nbytes)
        weakref.finalize(view, _free, self._flags_np, slot, owner)
        return torch.from_numpy(view), owner


class Slot:
    """A claimed slot, owned by this process until ``sent``."""

    def __init__(self, ring: BatchRing, index: int, nbytes: int):
        self.ring_token, self.index, self.nbytes, self.owned = ring.token, index, nbytes, True

    def sent(self) -> tuple:
        """The slot leaves with its batch: the receiver frees it. Returns receive's arguments."""
        self.owned = False
        return self.ring_token, self.index, self.nbytes


def _free(flags, slot, owner):
    if owner.owned:
        flags[slot] = 0


def claim(nbytes: int):
    """In a DataLoader worker whose loader has a ring: (a uint8 tensor of ``nbytes`` in a free slot, its Slot);
    otherwise, or with no slot free or large enough, None."""
    if _ATTACHED is None:
        return None
    info = torch.utils.data.get_worker_info()
    return None if info is None else _ATTACHED._claim(info.id, nbytes)


def receive(token, index: int, nbytes: int) -> torch.Tensor:
    """The buffer of a batch sent from a ring's slot, in the receiving process (which frees the slot)."""
    ring = _RINGS.get(token)
    if ring is None:
        raise RuntimeError(f"a batch arrived in slot {index} of batch ring {token}, which this process does not have")
    return ring._buffer(index, nbytes)[0]


__all__ = ["BatchRing", "Slot", "claim", "receive"]
