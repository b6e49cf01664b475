"""Batches built in reused shared memory (lxmert_fast.data.batch_ring): a slot is reused only once nothing views it,
in the process that owns it, and a batch holds the same bytes as one built in fresh memory."""

import gc

import pytest
import torch

from lxmert_fast.data import AnswerTable, FeatureStore, PretrainDataset, ensure_sample_data
from lxmert_fast.data.batch_ring import BatchRing, claim
from lxmert_fast.data.pretrain_dataset import compact_pretrain_collate, pretrain_collate
from lxmert_fast.train import feed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    sample = ensure_sample_data(tmp_path_factory.mktemp("ring") / "data", num_images=24, seed=5, feat_dim=16)
    store = FeatureStore.from_tsv(sample.features_tsv, progress=False)
    return PretrainDataset(sample.train_json, [store], AnswerTable(sample.answer_table), sample.tokenizer_dir, seed=3,
                           feature_dtype="float16")


class Batches(list):
    micro_batch = 4


def batches(dataset, count):
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    return Batches([order[4 * k : 4 * k + 4] for k in range(count)])


def ring_of(loader) -> BatchRing:
    return loader.worker_init_fn.__self__


def test_held_batches_keep_their_slots_and_contents(dataset):
    """The main process holds every batch: each worker fills its slots, then gets fresh memory; nothing is
    overwritten while viewed, and the slots are free again once the batches are gone."""
    sampler = batches(dataset, 24)
    loader = feed.training_loader(dataset, sampler, compact_pretrain_collate, num_workers=2, device="cpu")
    ring = ring_of(loader)
    held = list(loader)
    assert ring.in_use() == ring.workers * ring.slots_per_worker  # all slots in use, the rest in fresh memory
    for indices, batch in zip(sampler, held, strict=True):
        assert torch.equal(batch.buffer, dataset.__getitems__(indices).compact.buffer)
    views = held[0].views()["features"]  # a view keeps its slot, not the batch object
    del held, batch
    gc.collect()
    assert ring.in_use() == 1
    del views
    gc.collect()
    assert ring.in_use() == 0


def test_released_slots_are_reused_with_the_bytes_of_fresh_memory(dataset):
    """Batches let go as they come: a worker cycles through a few slots; padding between the arrays is zeroed, so
    every buffer equals the one built in fresh memory."""
    sampler = batches(dataset, 30)
    loader = feed.training_loader(dataset, sampler, compact_pretrain_collate, num_workers=1, device="cpu")
    ring = ring_of(loader)
    for indices, batch in zip(sampler, loader, strict=True):
        assert not batch.buffer.is_shared()  # a view of the ring, mapped once: not a segment of its own
        assert torch.equal(batch.buffer, dataset.__getitems__(indices).compact.buffer)
    del batch
    gc.collect()
    assert ring.in_use() == 0


def test_a_batch_expanded_in_the_worker_frees_its_slot_there(dataset):
    """pretrain_collate expands the compact batch in the worker: the slot is never sent, and the worker frees it
    once the dense tensors it was expanded into have been sent."""
    sampler = batches(dataset, 20)
    loader = feed.training_loader(dataset, sampler, pretrain_collate, num_workers=1, device="cpu")
    ring = ring_of(loader)
    held = list(loader)
    for indices, dense in zip(sampler, held, strict=True):
        expected = pretrain_collate(dataset.__getitems__(indices))
        assert torch.equal(dense["visual_feats"], expected["visual_feats"])
        assert torch.equal(dense["obj_labels"]["feat"][0], expected["obj_labels"]["feat"][0])
    assert ring.in_use() == 0  # 20 batches held in the main process, none of them in a slot


def test_a_batch_too_large_for_a_slot_or_outside_a_worker_gets_memory_of_its_own():
    ring = BatchRing(workers=1, slots_per_worker=2, slot_bytes=100)
    assert ring.slot_bytes == 4096  # whole pages
    assert claim(10) is None  # the main process: no ring attached
    assert ring._claim(0, 4097) is None and ring._claim(1, 10) is None  # too large; no such worker
    first, _second = ring._claim(0, 10), ring._claim(0, 4096)  # both held
    assert ring._claim(0, 10) is None and ring.in_use() == 2  # both slots in use
    del first
    gc.collect()
    assert ring.in_use() == 1
    buffer, slot = ring._claim(0, 10)
    assert slot.index == 0 and len(buffer) == 10


def test_a_ring_is_pinned_once_its_workers_have_started(dataset, monkeypatch):
    """On a GPU, page-locked in the main process after the workers have forked (CUDA may keep pinned pages out of
    a fork), once for the run."""
    from lxmert_fast.train.feed import DevicePrefetch

    forked = []

    def pin(ring):
        forked.append(bool(loader._iterator._workers))
        ring.pinned = True

    monkeypatch.setattr(BatchRing, "pin", pin)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: "a side stream")  # the GPU path, to the stream's use
    loader = feed.training_loader(dataset, batches(dataset, 6), compact_pretrain_collate, num_workers=1, device="cpu")
    prefetch = iter(DevicePrefetch(loader, lambda batch: batch, "cuda:0"))
    with pytest.raises(AttributeError):  # the first batch is queued on the (string) stream
        next(prefetch)
    assert forked == [True] and loader.batch_ring.pinned
    prefetch = iter(DevicePrefetch(loader, lambda batch: batch, "cuda:0"))  # the next epoch: pinned already
    with pytest.raises(AttributeError):
        next(prefetch)
    assert forked == [True]


class FakeEvent:
    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def test_host_batches_are_kept_until_their_copies_to_the_device_are_done():
    in_flight = feed.InFlight()
    events = [FakeEvent() for _ in range(4)]
    for k in range(3):
        in_flight.add(f"batch {k}", events[k])
    events[0].done = events[2].done = True  # events complete in order on one stream: 1 not yet, so 2 stays too
    in_flight.add("batch 3", events[3])
    assert [b for b, _ in in_flight.batches] == ["batch 1", "batch 2", "batch 3"]
    in_flight.wait()
    assert not in_flight.batches and all(e.done for e in events)
