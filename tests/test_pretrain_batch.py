"""The compact pre-training batch (lxmert_fast.data.pretrain_batch): each value once on the way, and expanded into
exactly the dense batch that the dataset built before, from the same random draws, with the same losses."""

import numpy as np
import pytest
import torch

from lxmert_fast.data import (
    IGNORE_INDEX,
    AnswerTable,
    CompactBatch,
    FeatureStore,
    PretrainDataset,
    compact_pretrain_collate,
    ensure_sample_data,
    pretrain_collate,
    pretrain_inputs,
)
from lxmert_fast.data.pretrain_batch import buffer_size, compact_fields

FEAT_DIM = 32


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return ensure_sample_data(tmp_path_factory.mktemp("sample") / "data", num_images=40, seed=3, feat_dim=FEAT_DIM)


@pytest.fixture(scope="module")
def datasets(sample):
    store = FeatureStore.from_tsv(sample.features_tsv, progress=False)
    table = AnswerTable(sample.answer_table)
    return {dtype: PretrainDataset(sample.train_json, [store], table, sample.tokenizer_dir, seed=11,
                                   feature_dtype=dtype, qa_from_epoch=1) for dtype in ("float16", "float32")}


def dense_batch_as_before(ds, keys):
    """The dense batch as the dataset built it before the compact batch (lxmert_fast 2026-12, pretrain_dataset.py's
    _text_inputs / _visual_inputs), from the dataset's own random draws."""
    draws = [ds._draw(*key) for key in keys]
    cls_id, sep_id, pad_id, mask_id = ds._special
    batch, length, boxes, rate = len(draws), ds.max_seq_length, ds.max_boxes, ds.word_mask_rate
    encoded = ds.tokenizer([ds.sentence(d.sent_index) for d in draws], add_special_tokens=False)["input_ids"]
    out = {"input_ids": np.full((batch, length), pad_id, dtype=np.int64),
           "labels": np.full((batch, length), IGNORE_INDEX, dtype=np.int64),
           "attention_mask": np.zeros((batch, length), dtype=np.int64),
           "token_type_ids": np.zeros((batch, length), dtype=np.int64)}
    for k, (d, tokens) in enumerate(zip(draws, encoded, strict=True)):
        tokens = np.asarray(tokens[: length - 2], dtype=np.int64)
        n, p = len(tokens), d.word_p[: len(tokens)]
        masked = tokens.copy()
        masked[p < 0.8 * rate] = mask_id
        swap = (p >= 0.8 * rate) & (p < 0.9 * rate)
        masked[swap] = d.word_random_ids[:n][swap]
        out["input_ids"][k, 0], out["input_ids"][k, 1 : n + 1], out["input_ids"][k, n + 1] = cls_id, masked, sep_id
        out["labels"][k, 1 : n + 1] = np.where(p < rate, tokens, IGNORE_INDEX)
        out["attention_mask"][k, : n + 2] = 1
    feats = np.empty((batch, boxes, ds.feat_dim), dtype=ds.feature_dtype)
    for name in ("visual_pos", "obj_conf", "attr_conf"):
        out[name] = np.empty((batch, boxes, 4) if name == "visual_pos" else (batch, boxes), dtype=np.float32)
    for name in ("visual_attention_mask", "obj_ids", "attr_ids"):
        out[name] = np.empty((batch, boxes), dtype=np.int64)
    for k, d in enumerate(draws):
        store, row = ds._image(d.img)
        feats[k] = store.features[row]
        out["visual_pos"][k] = store.boxes[row]
        out["visual_attention_mask"][k] = np.arange(boxes) < int(store.num_boxes[row])
        for name, source in (("obj_ids", "obj_ids"), ("obj_conf", "obj_conf"), ("attr_ids", "attr_ids"),
                             ("attr_conf", "attr_conf")):
            out[name][k] = getattr(store, source)[row]
    masked = np.stack([d.masked for d in draws])
    masked_feats = feats.copy()
    masked_feats[masked & (np.stack([d.obj_p for d in draws]) < 0.8 * ds.obj_mask_rate)] = 0.0
    for k, d in enumerate(draws):
        for i, other_store, other_row, j in d.replaced:
            masked_feats[k, i] = other_store.features[other_row, j]
    out.update(visual_feats=masked_feats, feat_target=feats, feat_mask=masked.astype(np.float32),
               matched_label=np.array([d.matched for d in draws], dtype=np.int64),
               ans=np.array([d.ans for d in draws], dtype=np.int64))
    return out


def flat(kwargs):
    """The forward's keyword arguments as {name: tensor}, obj_labels unpacked."""
    out = {k: v for k, v in kwargs.items() if k != "obj_labels"}
    for task, (labels, weights) in kwargs["obj_labels"].items():
        out[f"{task}_labels"], out[f"{task}_weights"] = labels, weights
    return out


def assert_bitwise_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        a, b = got[key], expected[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)), key  # -0.0 != 0.0 too


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_compact_batch_expands_to_the_dense_batch_of_before(datasets, dtype):
    ds = datasets[dtype]
    keys = [(epoch, i) for epoch in range(2) for i in range(0, len(ds), 2)]
    replaced = masked_words = 0
    for start in range(0, len(keys), 64):
        part = keys[start : start + 64]
        compact = compact_pretrain_collate(ds.__getitems__(part))
        assert isinstance(compact, CompactBatch) and len(compact) == len(part)
        views = compact.views()
        replaced, masked_words = replaced + len(views["replaced_at"]), masked_words + len(views["masked_words"])
        before = pretrain_collate([{k: v[i] for k, v in dense_batch_as_before(ds, part).items()}
                                   for i in range(len(part))])
        assert_bitwise_equal(flat(pretrain_inputs(compact, torch.device("cpu"))), flat(before))
        assert_bitwise_equal(flat(pretrain_collate(ds.__getitems__(part))), flat(before))
    assert replaced > 10 and masked_words > 100  # the rare cases were exercised


def test_dense_batches_pass_through(datasets):
    dense = pretrain_collate([datasets["float16"][i] for i in range(3)])
    assert pretrain_inputs(dense, torch.device("cpu")) is dense
    assert flat(compact_pretrain_collate([datasets["float16"][i] for i in range(3)])).keys() == flat(dense).keys()


def test_losses_are_those_of_the_dense_batch(datasets):
    from transformers import LxmertConfig, LxmertForPreTraining

    ds = datasets["float32"]
    config = LxmertConfig(vocab_size=ds.vocab_size, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                          l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=FEAT_DIM, visual_pos_dim=4,
                          num_object_labels=25, num_attr_labels=10, num_qa_labels=len(ds.answer_table))
    torch.manual_seed(0)
    model = LxmertForPreTraining(config).eval()
    keys = [(1, i) for i in range(16)]
    before = pretrain_collate([{k: v[i] for k, v in dense_batch_as_before(ds, keys).items()} for i in range(16)])
    with torch.no_grad():
        expected = model(**before).loss
        got = model(**pretrain_inputs(compact_pretrain_collate(ds.__getitems__(keys)), torch.device("cpu"))).loss
    assert torch.isfinite(expected) and got.view(torch.int32).item() == expected.view(torch.int32).item()


def test_a_release_sample_travels_in_under_150_kib():
    """At the release's shapes (36 boxes of 2048 fp16 features, 20 tokens) and the expected number of masked words
    and replaced objects, a sample is the features once plus ~3 KiB (the dense batch: 284 KiB)."""
    batch = 256
    replaced, masked_words = round(batch * 36 * 0.15 * 0.1), round(batch * 11 * 0.15)
    nbytes = buffer_size(compact_fields(batch, 20, 36, 2048, np.float16, masked_words, replaced))
    assert 36 * 2048 * 2 < nbytes / batch <= 150 * 1024


def test_a_worker_ships_its_buffer_without_a_copy(datasets):
    ds = datasets["float16"]
    sampler = [list(range(k, k + 8)) for k in range(0, 32, 8)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=1,
                                         collate_fn=compact_pretrain_collate)
    for indices, compact in zip(sampler, loader, strict=True):
        assert compact.buffer.is_shared()  # the worker's segment, mapped: not copied into a fresh one
        assert_bitwise_equal(flat(pretrain_inputs(compact)), flat(pretrain_collate(ds.__getitems__(indices))))
