"""Tests of lxmert_fast.data: released formats, the fp16 feature store, the pre-training dataset, sample data."""

import json
import multiprocessing
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from lxmert_fast.data import (
    ATTRIBUTE_NAMES,
    IGNORE_INDEX,
    OBJECT_NAMES,
    AnnotationFormatError,
    AnswerTable,
    FeatureFormatError,
    FeatureStore,
    ImageFeatures,
    PretrainDataset,
    StoreError,
    convert_tsv,
    default_store_dir,
    ensure_sample_data,
    normalize_answer,
    pretrain_collate,
    read_feature_tsv,
    write_feature_tsv,
)
from lxmert_fast.data import feature_store as feature_store_module
from lxmert_fast.data.formats import encode_tsv_row

FEAT_DIM = 32


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return ensure_sample_data(tmp_path_factory.mktemp("sample") / "data", num_images=40, seed=3, feat_dim=FEAT_DIM)


@pytest.fixture(scope="module")
def store(sample):
    return FeatureStore.from_tsv(sample.features_tsv, progress=False)


@pytest.fixture(scope="module")
def table(sample):
    return AnswerTable(sample.answer_table)


@pytest.fixture(scope="module")
def dataset(sample, store, table):
    return PretrainDataset(sample.train_json, [store], table, sample.tokenizer_dir, seed=7)


def _record(img_id, n=36, feat_dim=FEAT_DIM, seed=0, h=480, w=640):
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
    return ImageFeatures(
        img_id=img_id,
        img_h=h,
        img_w=w,
        objects_id=rng.integers(0, 1600, n),
        objects_conf=rng.random(n).astype(np.float32),
        attrs_id=rng.integers(0, 400, n),
        attrs_conf=rng.random(n).astype(np.float32),
        boxes=boxes.astype(np.float32),
        features=(rng.random((n, feat_dim)) * 10).astype(np.float32),
    )


def _leftovers(tsv):
    """Anything a conversion of `tsv` could have left: the store or a staging / old copy of it."""
    store = default_store_dir(tsv)
    return sorted(p.name for p in store.parent.glob(store.name + "*") if not p.name.endswith(".lock"))


# --- released formats and the store -----------------------------------------------------------------------------


def test_tsv_round_trip_through_store(tmp_path):
    records = [_record("img_a", seed=1), _record("img_b", n=10, seed=2), _record("img_c", seed=3)]
    tsv = tmp_path / "feats.tsv"
    write_feature_tsv(tsv, records)
    back = list(read_feature_tsv(tsv))
    assert [r.img_id for r in back] == ["img_a", "img_b", "img_c"]
    for a, b in zip(records, back, strict=True):
        for field in ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert (a.img_h, a.img_w, a.num_boxes) == (b.img_h, b.img_w, b.num_boxes)

    store = FeatureStore(convert_tsv(tsv, progress=False))
    assert (len(store), store.feat_dim, store.max_boxes) == (3, FEAT_DIM, 36)
    assert store.features.dtype == np.float16 and store.features.shape == (3, 36, FEAT_DIM)
    for r in records:
        i, n = store.row(r.img_id), r.num_boxes
        assert store.num_boxes[i] == n and tuple(store.img_hw[i]) == (r.img_h, r.img_w)
        np.testing.assert_allclose(store.features[i, :n], r.features, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(store.boxes[i, :n], r.boxes / [r.img_w, r.img_h, r.img_w, r.img_h], rtol=1e-6)
        np.testing.assert_array_equal(store.obj_ids[i, :n], r.objects_id)
        np.testing.assert_array_equal(store.attr_conf[i, :n], r.attrs_conf)
        assert not store.features[i, n:].any() and not store.obj_conf[i, n:].any()  # zero padding
    assert "img_b" in store and "img_z" not in store
    with pytest.raises(KeyError, match="img_z"):
        store.row("img_z")
    # Pickles without its maps (workers re-map lazily instead of receiving a copy of the arrays).
    clone = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 10_000
    np.testing.assert_array_equal(clone.features[1], store.features[1])


def test_store_is_reused_until_the_tsv_changes(tmp_path):
    tsv = tmp_path / "feats.tsv"
    write_feature_tsv(tsv, [_record("a"), _record("b", seed=1)])
    store_dir = convert_tsv(tsv, progress=False)
    stamp = (store_dir / "meta.json").stat().st_mtime_ns
    assert convert_tsv(tsv, progress=False) == store_dir
    assert (store_dir / "meta.json").stat().st_mtime_ns == stamp
    write_feature_tsv(tsv, [_record("a"), _record("b", seed=1), _record("c", seed=2)])
    assert len(FeatureStore(convert_tsv(tsv, progress=False))) == 3
    assert _leftovers(tsv) == [store_dir.name]


def _convert_quietly(tsv):
    return str(convert_tsv(tsv, progress=False))


def test_concurrent_conversions_build_one_store(tmp_path):
    tsv = tmp_path / "feats.tsv"
    write_feature_tsv(tsv, [_record(f"i{k}", seed=k) for k in range(20)])
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_convert_quietly, [tsv, tsv, tsv])
    assert set(results) == {str(default_store_dir(tsv))}
    assert _leftovers(tsv) == [default_store_dir(tsv).name] and len(FeatureStore(results[0])) == 20


def test_feature_dim_is_a_parameter(tmp_path):
    tsv = tmp_path / "feats.tsv"
    write_feature_tsv(tsv, [_record("a", feat_dim=7)])
    assert FeatureStore(convert_tsv(tsv, progress=False)).feat_dim == 7
    with pytest.raises(FeatureFormatError, match="features"):
        convert_tsv(tsv, tmp_path / "other.store", feat_dim=8, progress=False)


def _replace_column(line, index, value):
    cols = line.rstrip("\n").split("\t")
    cols[index] = value
    return "\t".join(cols) + "\n"


def _bad_lines():
    good = encode_tsv_row(_record("img_bad", seed=5))
    outside = _record("img_bad", seed=5)
    outside.boxes[3, 2] = outside.img_w + 5.0
    short = _record("img_bad", seed=5)
    short.features = short.features[:, :-1]
    return {
        "column count": (good.replace("\t", "\t\t", 1), "columns"),
        "bad base64": (_replace_column(good, 4, "@@not*base64@@"), "base64"),
        "array size": (encode_tsv_row(short), "features"),
        "short boxes": (_replace_column(good, 8, encode_tsv_row(_record("x", n=35)).split("\t")[8]), "boxes"),
        "boxes outside": (encode_tsv_row(outside), "outside"),
        "num_boxes not int": (_replace_column(good, 7, "3x6"), "num_boxes"),
        "too many boxes": (encode_tsv_row(_record("img_bad", n=37, seed=5)), "max_boxes"),
        "duplicate img_id": (encode_tsv_row(_record("img_ok", seed=9)), "duplicate"),
    }


@pytest.mark.parametrize("case", list(_bad_lines()))
def test_bad_rows_are_rejected_with_file_line_and_img_id(tmp_path, case):
    line, what = _bad_lines()[case]
    tsv = tmp_path / "feats.tsv"
    with open(tsv, "w") as f:
        f.write(encode_tsv_row(_record("img_ok", seed=9)))
        f.write(encode_tsv_row(_record("img_ok2", seed=8)))
        f.write(line)
    with pytest.raises(FeatureFormatError) as err:
        convert_tsv(tsv, progress=False)
    message = str(err.value)
    img_id = "img_ok" if case == "duplicate img_id" else "img_bad"
    assert f"{tsv}:3" in message and repr(img_id) in message and what in message, message
    if case == "duplicate img_id":
        assert "already on line 1" in message
    assert _leftovers(tsv) == []


def test_interrupted_conversion_leaves_nothing_trusted(tmp_path, monkeypatch):
    tsv = tmp_path / "feats.tsv"
    write_feature_tsv(tsv, [_record(f"i{k}", seed=k) for k in range(4)])
    real = feature_store_module.iter_feature_tsv

    def dies_after_two_rows(*args, **kwargs):
        for k, row in enumerate(real(*args, **kwargs)):
            if k == 2:
                raise KeyboardInterrupt
            yield row

    monkeypatch.setattr(feature_store_module, "iter_feature_tsv", dies_after_two_rows)
    with pytest.raises(KeyboardInterrupt):
        convert_tsv(tsv, progress=False)
    assert _leftovers(tsv) == []
    with pytest.raises(StoreError):
        FeatureStore(default_store_dir(tsv))

    # A SIGKILLed conversion leaves a staging dir: never read, removed by the next conversion.
    monkeypatch.setattr(feature_store_module, "iter_feature_tsv", real)
    staging = tmp_path / "feats.tsv.store.tmp-999-dead"
    staging.mkdir()
    (staging / "features.bin").write_bytes(b"\0" * 10)
    assert len(FeatureStore(convert_tsv(tsv, progress=False))) == 4
    assert not staging.exists()

    # A damaged published store is detected, not read.
    with open(default_store_dir(tsv) / "features.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match="features.bin"):
        FeatureStore(default_store_dir(tsv))
    assert len(FeatureStore(convert_tsv(tsv, progress=False))) == 4  # and reconverted


# --- answers and annotations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("the Grey.", "gray"),
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("ten", "10"),
        ("two dogs", "two dogs"),
        ("yes", "yes"),
        ("zero", "zero"),
        (" two", " two"),
        ("a the dog", "dog"),
        ("a a man", "man"),
        ("theater", "theater"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_answer_table(tmp_path):
    path = tmp_path / "all_ans.json"
    path.write_text(
        json.dumps(
            [{"ans": "2", "dsets": ["vqa"]}, {"ans": "gray", "dsets": ["gqa"]}, {"ans": "dog", "dsets": ["vqa", "gqa"]}]
        )
    )
    full = AnswerTable(path)
    assert (len(full), full.ans2id("two"), full.ans2id("The grey"), full.ans2id("cat")) == (3, 0, 1, None)
    gqa = AnswerTable(path, dsets=["gqa"])
    assert gqa.answers == ["gray", "dog"] and gqa.ans2id("a dog") == 1


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "record, what",
    [
        ({"img_id": "X", "sentf": {"mscoco": ["a cat", "  "]}}, "sentf['mscoco'][1] is empty"),
        ({"img_id": "X", "sentf": {"vqa": ["what?"]}, "labelf": {"vqa": []}}, "parallel"),
        ({"img_id": "X", "sentf": {"vqa": ["what?"]}, "labelf": {"vqa": [{"2": -1}]}}, "invalid score"),
        ({"sentf": {"vqa": ["what?"]}}, "img_id"),
    ],
)
def test_bad_annotations_are_rejected(tmp_path, sample, store, table, record, what):
    path = _write_json(tmp_path / "bad.json", [{"img_id": store.img_ids[0], "sentf": {"vg": ["ok"]}}, record])
    with pytest.raises(AnnotationFormatError) as err:
        PretrainDataset(path, [store], table, sample.tokenizer_dir)
    assert str(path) in str(err.value) and "record 1" in str(err.value) and what in str(err.value)


def test_annotations_without_features_are_dropped_and_counted(tmp_path, sample, store, table, caplog):
    data = [
        {"img_id": store.img_ids[0], "sentf": {"vg": ["a red dog", "a dog"]}},
        {"img_id": store.img_ids[1], "sentf": {"vg": ["a cat"]}},
        {"img_id": "missing", "sentf": {"vg": ["x", "y"], "vqa": ["z?"]}, "labelf": {"vqa": [{"2": 1.0}]}},
    ]
    path = _write_json(tmp_path / "a.json", data)
    with caplog.at_level("WARNING"):
        ds = PretrainDataset(path, [store], table, sample.tokenizer_dir)
    assert len(ds) == 3 and ds.num_dropped == 3 and "left out 3 sentences" in caplog.text
    assert f"{path}: 1 record (img_id 'missing')" in caplog.text and "--strict" in caplog.text
    with pytest.raises(AnnotationFormatError, match=r"a\.json: 1 record \(img_id 'missing'\).*strict"):
        PretrainDataset(path, [store], table, sample.tokenizer_dir, strict=True)
    with pytest.raises(ValueError, match="no usable sentences"):
        PretrainDataset(_write_json(tmp_path / "b.json", data[2:]), [store], table, sample.tokenizer_dir)


# --- the pre-training dataset ----------------------------------------------------------------------------------


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_items_are_a_function_of_seed_epoch_index(sample, store, table, dataset):
    twin = PretrainDataset(sample.train_json, [store], table, sample.tokenizer_dir, seed=7)
    assert all(_same(dataset[i], twin[i]) for i in (0, 5, 99))
    twin.set_epoch(1)
    assert sum(not _same(dataset[i], twin[i]) for i in range(20)) >= 18
    assert all(_same(twin[i], dataset[(1, i)]) for i in range(5))
    other_seed = PretrainDataset(sample.train_json, [store], table, sample.tokenizer_dir, seed=8)
    assert sum(not _same(dataset[i], other_seed[i]) for i in range(20)) >= 18


def test_batches_do_not_depend_on_the_number_of_workers(dataset):
    subset = torch.utils.data.Subset(dataset, list(range(0, 48, 3)))
    runs = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(subset, batch_size=4, num_workers=workers, collate_fn=pretrain_collate)
        runs.append([b["input_ids"] for b in loader] + [b["obj_labels"]["feat"][1] for b in loader])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_a_batch_holds_the_items_it_would_hold_one_by_one(sample, store, table, dataset):
    """The DataLoader builds a whole batch at once (__getitems__): an item's values must not depend on its batch,
    and float16 features (what pretrain.py ships) must be the float32 ones in half the bytes."""
    keys = [(1, 40), 3, (0, 17), 3, 88]
    batch = pretrain_collate(dataset.__getitems__(keys))
    one_by_one = pretrain_collate([dataset[k] for k in keys])
    flat = lambda b: [b[k] for k in sorted(b) if k != "obj_labels"] + [t for v in b["obj_labels"].values() for t in v]
    assert all(torch.equal(a, b) for a, b in zip(flat(batch), flat(one_by_one), strict=True))
    default = torch.utils.data.default_collate(dataset.__getitems__(keys))  # a DataLoader without collate_fn
    assert torch.equal(default["visual_feats"], batch["visual_feats"])
    assert torch.equal(default["labels"], batch["labels"])
    half = PretrainDataset(sample.train_json, [store], table, sample.tokenizer_dir, seed=7, feature_dtype="float16")
    half_batch = pretrain_collate(half.__getitems__(keys))
    assert half_batch["visual_feats"].dtype == torch.float16
    assert torch.equal(half_batch["visual_feats"].float(), batch["visual_feats"])
    assert torch.equal(half_batch["obj_labels"]["feat"][0].float(), batch["obj_labels"]["feat"][0])
    with pytest.raises(ValueError, match="feature_dtype"):
        PretrainDataset(sample.train_json, [store], table, sample.tokenizer_dir, feature_dtype="int8")


def test_masking_and_mismatch_rates(sample, store, table):
    ds = PretrainDataset(sample.train_json, [store], table, sample.tokenizer_dir, seed=1)
    mask_id = ds.tokenizer.mask_token_id
    words = masked = as_mask = kept = objects = obj_masked = zeroed = obj_kept = matched = 0
    items = [ds[(epoch, i)] for epoch in range(12) for i in range(len(ds))][:3000]
    assert len(items) == 3000
    for it in items:
        lab = it["labels"]
        words += it["attention_mask"].sum() - 2
        sel = lab != IGNORE_INDEX
        masked += sel.sum()
        as_mask += (it["input_ids"][sel] == mask_id).sum()
        kept += (it["input_ids"][sel] == lab[sel]).sum()
        valid = it["visual_attention_mask"].astype(bool)
        objects += valid.sum()
        m = it["feat_mask"].astype(bool)
        assert not (m & ~valid).any()
        obj_masked += m.sum()
        zeroed += (~it["visual_feats"][m].any(axis=1)).sum()
        obj_kept += (it["visual_feats"][m] == it["feat_target"][m]).all(axis=1).sum()
        unmasked = ~m
        assert np.array_equal(it["visual_feats"][unmasked], it["feat_target"][unmasked])
        matched += it["matched_label"]
    n = len(items)
    assert abs(masked / words - 0.15) < 0.015
    assert abs(as_mask / masked - 0.8) < 0.04 and abs(kept / masked - 0.1) < 0.03
    assert abs(obj_masked / objects - 0.15) < 0.01
    assert abs(zeroed / obj_masked - 0.8) < 0.03 and abs(obj_kept / obj_masked - 0.1) < 0.02
    assert abs(matched / n - 0.5) < 0.04


def test_matched_pairs_keep_their_sentence_and_mismatched_ones_lose_the_qa_label(dataset):
    seen = set()
    for i in range(60):
        it = dataset[i]
        n = it["attention_mask"].sum() - 2
        labels, ids = it["labels"][1 : n + 1], it["input_ids"][1 : n + 1]
        unmasked = np.where(labels != IGNORE_INDEX, labels, ids)  # the sentence before word masking
        if it["matched_label"] == 1:
            assert unmasked.tolist() == dataset.tokenizer.encode(dataset.sentence(i), add_special_tokens=False)[:18]
        else:
            assert it["ans"] == IGNORE_INDEX
        seen.add(int(it["matched_label"]))
    assert seen == {0, 1}


def test_qa_labels(tmp_path, sample, store, table):
    question = {"2": 1.0, "three": 0.5, "dunno": 0.7}  # "three" -> "3"; "dunno" is not in the table
    data = [
        {
            "img_id": store.img_ids[0],
            "sentf": {"mscoco": ["a dog"], "vqa": ["how many dogs?", "what is it?"]},
            "labelf": {"vqa": [question, {"dunno": 1.0}]},
        },
    ]
    path = _write_json(tmp_path / "qa.json", data)
    ds = PretrainDataset(path, [store], table, sample.tokenizer_dir, task_matched=False, qa_from_epoch=2)
    assert [ds.uid(i) for i in range(3)] == [f"{store.img_ids[0]}_{s}" for s in ("mscoco_0", "vqa_0", "vqa_1")]
    ds.set_epoch(1)
    assert not ds.qa_enabled and ds[1]["ans"] == IGNORE_INDEX
    ds.set_epoch(2)
    assert ds.qa_enabled and ds[1]["ans"] != IGNORE_INDEX
    answers = [int(ds[(epoch, 1)]["ans"]) for epoch in range(2, 1502)]
    assert set(answers) == {table.ans2id("2"), table.ans2id("3")}
    assert abs(answers.count(table.ans2id("2")) / len(answers) - 1 / 1.5) < 0.04
    assert ds[(2, 0)]["ans"] == IGNORE_INDEX  # a caption
    assert ds[(2, 2)]["ans"] == IGNORE_INDEX  # no known answer


def test_long_sentences_are_truncated_and_padding_is_masked(tmp_path, sample, table):
    tsv = tmp_path / "feats.tsv"
    write_feature_tsv(tsv, [_record("few", n=10), _record("full", seed=1)])
    long = " ".join(["dog"] * 40)
    path = _write_json(
        tmp_path / "a.json",
        [{"img_id": "few", "sentf": {"vg": [long]}}, {"img_id": "full", "sentf": {"vg": ["a cat"]}}],
    )
    ds = PretrainDataset(path, [tsv], table, sample.tokenizer_dir, word_mask_rate=0.0)
    it = ds[0]
    assert it["attention_mask"].all() and it["input_ids"][-1] == ds.tokenizer.sep_token_id
    assert (it["labels"] == IGNORE_INDEX).all()
    assert it["visual_attention_mask"].sum() == 10 and not it["feat_mask"][10:].any()


def test_text_length_stats_are_those_of_the_items(tmp_path, sample, table):
    """The statistics behind StaticShapes.from_statistics: the lengths the items have ([CLS] and [SEP] included,
    long sentences cut to max_seq_length)."""
    tsv = tmp_path / "feats.tsv"
    write_feature_tsv(tsv, [_record("img")])
    sentences = ["a cat", "a dog on a mat", " ".join(["dog"] * 40)]
    path = _write_json(tmp_path / "a.json", [{"img_id": "img", "sentf": {"vg": sentences}}])
    ds = PretrainDataset(path, [tsv], table, sample.tokenizer_dir, task_matched=False)
    lengths = np.array([ds[i]["attention_mask"].sum() for i in range(len(ds))], dtype=np.float64)
    assert lengths.max() == ds.max_seq_length
    mean, std = ds.text_length_stats()
    assert (mean, std) == pytest.approx((lengths.mean(), lengths.std()))
    assert ds.text_length_stats(samples=2) == pytest.approx((lengths[[0, 2]].mean(), lengths[[0, 2]].std()))


def test_collate_matches_lxmert_forward_kwargs(dataset):
    batch = pretrain_collate([dataset[i] for i in range(5)])
    B, L, F = 5, 20, FEAT_DIM
    expected = {
        "input_ids": ((B, L), torch.long),
        "attention_mask": ((B, L), torch.long),
        "token_type_ids": ((B, L), torch.long),
        "labels": ((B, L), torch.long),
        "visual_feats": ((B, 36, F), torch.float32),
        "visual_pos": ((B, 36, 4), torch.float32),
        "visual_attention_mask": ((B, 36), torch.long),
        "matched_label": ((B,), torch.long),
        "ans": ((B,), torch.long),
    }
    assert set(batch) == set(expected) | {"obj_labels"}
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    for key, width in (("obj", None), ("attr", None), ("feat", F)):
        labels, weight = batch["obj_labels"][key]
        assert labels.shape == ((B, 36) if width is None else (B, 36, width))
        assert labels.dtype == (torch.long if width is None else torch.float32)
        assert weight.shape == (B, 36) and weight.dtype == torch.float32
    assert ((batch["visual_pos"] >= 0) & (batch["visual_pos"] <= 1)).all()


def test_sample_batch_trains_transformers_lxmert(dataset, table):
    from transformers import LxmertConfig, LxmertForPreTraining

    items = [dataset[i] for i in range(16)]
    assert any(it["ans"] != IGNORE_INDEX for it in items)
    config = LxmertConfig(
        vocab_size=dataset.vocab_size,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        l_layers=1,
        x_layers=1,
        r_layers=1,
        visual_feat_dim=FEAT_DIM,
        visual_pos_dim=4,
        num_object_labels=len(OBJECT_NAMES),
        num_attr_labels=len(ATTRIBUTE_NAMES),
        num_qa_labels=len(table),
    )
    torch.manual_seed(0)
    model = LxmertForPreTraining(config)
    out = model(**pretrain_collate(items))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()


def test_ensure_sample_data(tmp_path, sample):
    assert ensure_sample_data(sample.root, num_images=40, seed=3, feat_dim=FEAT_DIM) == sample  # re-used
    paths = [sample.train_json, sample.valid_json, sample.features_tsv, sample.answer_table, sample.tokenizer_dir]
    assert all(os.path.exists(p) for p in paths)
    train = json.loads(sample.train_json.read_text())
    assert {"img_id", "sentf", "labelf"} <= set(train[0]) and len(train) == 36
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_sample_data(taken, num_images=4, feat_dim=8)
    assert (taken / "notes.txt").exists()


def test_sample_features_are_learnable(store):
    """Object classes are recoverable from the features alone (nearest class mean), so obj/attr losses can fall."""
    n = store.num_boxes
    feats = np.concatenate([store.features[i, : n[i]] for i in range(len(store))]).astype(np.float32)
    labels = np.concatenate([store.obj_ids[i, : n[i]] for i in range(len(store))])
    classes = np.unique(labels)
    means = np.stack([feats[labels == c].mean(0) for c in classes])
    nearest = classes[((feats[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
    assert (nearest == labels).mean() > 0.9


def test_ensure_sample_data_regenerates_for_other_parameters(tmp_path):
    first = ensure_sample_data(tmp_path / "s", num_images=4, seed=0, feat_dim=8)
    assert len(json.loads(first.train_json.read_text())) == 3
    second = ensure_sample_data(tmp_path / "s", num_images=12, seed=0, feat_dim=8)
    assert len(json.loads(second.train_json.read_text())) == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "s.lock"]


def test_workers_forked_after_parallel_tokenization_do_not_hang(sample):
    """With TOKENIZERS_PARALLELISM=true tokenizers' own fork guard is off: a worker forked after the parent tokenized
    in parallel used to wait forever on the thread pool that did not survive the fork."""
    script = (
        "import sys, torch\n"
        "from lxmert_fast.data import AnswerTable, FeatureStore, PretrainDataset, compact_pretrain_collate\n"
        "tsv, train, table, tok = sys.argv[1:]\n"
        "ds = PretrainDataset(train, [FeatureStore.from_tsv(tsv, progress=False)], AnswerTable(table), tok)\n"
        "ds.tokenizer([ds.sentence(i % len(ds)) for i in range(20000)])  # the thread pool starts, in parallel\n"
        "batches = [list(range(k, k + 16)) for k in range(0, 64, 16)]\n"
        "loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=2,\n"
        "                                     collate_fn=compact_pretrain_collate)\n"
        "print(sum(len(b) for b in loader))\n"
    )
    args = [str(p) for p in (sample.features_tsv, sample.train_json, sample.answer_table, sample.tokenizer_dir)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split()[-1] == "64", out.stderr[-2000:]


@pytest.mark.parametrize("chunk_chars", [1, 7, 1 << 22])
def test_annotations_stream_in_chunks_to_the_same_records_and_errors(tmp_path, sample, chunk_chars):
    from lxmert_fast.data.formats import _json_list_items

    assert list(_json_list_items(sample.train_json, chunk_chars)) == json.loads(sample.train_json.read_text())
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"img_id": "a", "sentf": {}},\n  {"img_id": "b" "sentf": {}}\n]\n')
    with pytest.raises(AnnotationFormatError, match=r"broken\.json:3:18: not valid JSON"):
        list(_json_list_items(broken, chunk_chars))


_GENERATE = "import sys; from lxmert_fast.data import make_sample_data; make_sample_data(sys.argv[1], 60, 5, 8)"


def test_sample_data_is_byte_identical_across_processes(tmp_path):
    """Same seed, same files, vocabulary included: nodes that each generate the sample train on the same token ids."""
    import subprocess
    import sys

    for hash_seed in ("0", "1"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", _GENERATE, str(tmp_path / hash_seed)], env=env, check=True)
    first = {p.relative_to(tmp_path / "0"): p.read_bytes() for p in (tmp_path / "0").rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path / "1"): p.read_bytes() for p in (tmp_path / "1").rglob("*") if p.is_file()}
    assert sorted(first) == sorted(second) and len(first) > 5
    assert [str(p) for p in sorted(first) if first[p] != second[p]] == []
