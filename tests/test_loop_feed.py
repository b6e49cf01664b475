"""The host side of the training loop: the losses kept on the device (no host-device sync per step) with the
non-finite guard that skips updates on the device, and the loader that feeds the step."""

import pytest
import torch

from lxmert_fast.train.metrics import LossGuard
from lxmert_fast.train.optimization import BertAdam, build_optimizer


def _losses(total, mlm):
    return {"loss": torch.tensor(total), "mlm_loss": torch.tensor(mlm)}


def test_loss_guard_means_match_python_sums_and_flag_sticks():
    guard = LossGuard("cpu")
    steps = [(2.5, 1.25), (2.0, 1.0), (1.75, 0.5)]
    for i, (total, mlm) in enumerate(steps):
        guard.add(_losses(total, mlm), micro_step=i)
    reading = guard.read()
    assert reading.bad_micro_step is None and guard.found_inf.item() == 0
    assert reading.means == {"loss": (0.0 + 2.5 + 2.0 + 1.75) / 3, "mlm_loss": (0.0 + 1.25 + 1.0 + 0.5) / 3}
    guard.reset_means()
    guard.add(_losses(float("nan"), 3.0), micro_step=3)
    guard.add(_losses(float("inf"), 2.0), micro_step=4)  # a later bad step does not replace the first
    guard.add(_losses(1.0, 1.0), micro_step=5)  # the flag stays up
    reading = guard.read()
    assert reading.bad_micro_step == 3 and guard.found_inf.item() == 1
    assert reading.bad_losses["mlm_loss"] == 3.0 and reading.bad_losses["loss"] != reading.bad_losses["loss"]
    assert reading.means == {"loss": 1.0 / 3, "mlm_loss": 6.0 / 3}  # non-finite values count as 0


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(37, 5, generator=g)), torch.nn.Parameter(torch.randn(11, generator=g))]


@pytest.mark.parametrize("name", ["bertadam", "adamw"])
def test_found_inf_skips_the_update_bit_for_bit_and_changes_nothing_otherwise(name):
    plain, gated = _params(), _params()
    opt_plain, opt_gated = build_optimizer(plain, name, lr=1e-2), build_optimizer(gated, name, lr=1e-2)
    opt_gated.found_inf = torch.zeros(())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(plain, gated, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_plain.step()
        opt_gated.step()
    assert all(torch.equal(a, b) for a, b in zip(plain, gated, strict=True))  # the gate open: the same arithmetic
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt_gated.state[p].items() if torch.is_tensor(v)})
              for p in gated]
    for p in gated:
        p.grad = torch.full_like(p, float("nan"))
    opt_gated.found_inf.fill_(1)
    opt_gated.step()
    for p, (weights, state) in zip(gated, before, strict=True):
        assert torch.equal(p, weights)
        for k, v in state.items():
            assert torch.equal(opt_gated.state[p][k], v), k


def test_bertadam_gate_handles_half_precision_gradients():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = BertAdam([p], lr=1e-2)
    opt.found_inf = torch.ones(())
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert torch.equal(p, torch.ones(4, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------------- the loader
FEAT_DIM = 16


@pytest.fixture(scope="module")
def pretrain_set(tmp_path_factory):
    from lxmert_fast.data import AnswerTable, FeatureStore, PretrainDataset, ensure_sample_data

    sample = ensure_sample_data(tmp_path_factory.mktemp("feed") / "data", num_images=24, seed=5, feat_dim=FEAT_DIM)
    store = FeatureStore.from_tsv(sample.features_tsv, progress=False)
    # qa_from_epoch=1: epochs 0 and 1 differ in what an item holds, not only in their order
    return PretrainDataset(sample.train_json, [store], AnswerTable(sample.answer_table), sample.tokenizer_dir, seed=3,
                           feature_dtype="float16", qa_from_epoch=1)


@pytest.mark.parametrize("start", [0, 2])
def test_epoch_batches_give_the_order_of_sampling(start):
    from lxmert_fast.train import feed, sampling

    for keyed in (False, True):
        batches = feed.EpochBatches(103, 4, seed=7, rank=1, world=3, keyed=keyed)
        for epoch in (0, 1, 5):
            batches.set_epoch(epoch, start, 6)
            expected = sampling.epoch_batches(103, 4, 7, epoch, 1, 3, start=start)[: 6 - start]
            got = list(batches)
            assert len(got) == len(batches) == 6 - start
            assert got == ([[(epoch, i) for i in b] for b in expected] if keyed else expected)


def test_persistent_workers_give_the_batches_of_a_loader_made_per_epoch(pretrain_set):
    from lxmert_fast.data import compact_pretrain_collate
    from lxmert_fast.train import feed, sampling

    batches = feed.EpochBatches(len(pretrain_set), 4, seed=1, rank=0, world=1, keyed=feed.epoch_keyed(pretrain_set))
    loader = feed.training_loader(pretrain_set, batches, compact_pretrain_collate, num_workers=1, device="cpu")
    assert loader.persistent_workers and not loader.pin_memory  # a CPU engine: nothing to pin
    per_epoch = sampling.num_micro_batches(len(pretrain_set), 4, 1)
    for epoch, start in ((0, 0), (1, 0), (2, 1)):
        batches.set_epoch(epoch, start, per_epoch)
        persistent = [b.buffer.clone() for b in loader]
        pretrain_set.set_epoch(epoch)  # as before: the epoch set on the dataset, a new loader
        order = sampling.epoch_batches(len(pretrain_set), 4, 1, epoch, 0, 1, start=start)
        fresh = torch.utils.data.DataLoader(pretrain_set, batch_sampler=order, collate_fn=compact_pretrain_collate,
                                            num_workers=1)
        expected = [b.buffer for b in fresh]
        assert len(persistent) == len(expected) == per_epoch - start
        assert all(torch.equal(a, b) for a, b in zip(persistent, expected, strict=True)), epoch
    pretrain_set.set_epoch(0)


def test_a_gpu_engine_pins_the_loader_memory(pretrain_set):
    from lxmert_fast.train import feed

    batches = feed.EpochBatches(len(pretrain_set), 4, seed=1, rank=0, world=1, keyed=True)
    assert feed.training_loader(pretrain_set, batches, None, num_workers=0, device="cuda:0").pin_memory
    assert not feed.training_loader(pretrain_set, batches, None, num_workers=0, device="cpu").pin_memory


def test_prefetch_prepares_in_order_on_the_cpu():
    from lxmert_fast.train.feed import DevicePrefetch

    prepared = []

    def prepare(x):
        prepared.append(x)
        return x * 10

    assert list(DevicePrefetch(range(5), prepare, "cpu")) == [0, 10, 20, 30, 40]
    assert prepared == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream prefetch runs on a CUDA device only")
def test_prefetch_on_a_side_stream_gives_the_batches_in_order():
    from lxmert_fast.train.feed import DevicePrefetch

    host = [torch.arange(1 << 20, dtype=torch.float32).pin_memory() + i for i in range(6)]
    seen = []
    for i, batch in enumerate(DevicePrefetch(host, lambda x: {"x": x.to("cuda", non_blocking=True) * 2}, "cuda")):
        torch.cuda._sleep(1_000_000)  # a slow step on the step's stream while the next copy is queued
        seen.append(torch.equal(batch["x"].cpu(), host[i] * 2))
    assert all(seen) and len(seen) == 6
