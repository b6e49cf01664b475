"""Bad inputs are refused at start-up with the file and the record (or the flag and its value), before anything is
written: tokenizers that did not really load, flipped boxes, negative confidences, an img_id in two feature files,
label ids or feature widths the model cannot take, images missing from the features, broken JSON files, and model
configs with impossible sizes. The data layer is tested directly for pre-training and the three fine-tuning tasks;
one run of each entry script shows that a refused input stops it with the output folder untouched."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lxmert_fast import LxmertConfig, LxmertForPreTraining
from lxmert_fast.data import (
    AnnotationFormatError,
    AnswerTable,
    FeatureFormatError,
    FeatureStore,
    ImageFeatures,
    PretrainDataset,
    convert_tsv,
    default_store_dir,
    ensure_sample_data,
    read_feature_tsv,
    write_feature_tsv,
)
from lxmert_fast.data.finetune_dataset import AnswerVocab, NLVR2Dataset, QADataset, read_annotations
from lxmert_fast.data.finetune_sample import ensure_finetune_sample
from lxmert_fast.data.tokenizer import check_tokenizer, load_tokenizer
from lxmert_fast.errors import CheckpointError, JSONFileError, TokenizerError
from lxmert_fast.model.checks import (
    ConfigError,
    check_features,
    check_model_folder,
    check_model_sizes,
    load_model_config,
)
from lxmert_fast.tasks.task_models import build_task_model

FEAT_DIM = 32
TASKS = ("pretrain", "vqa", "gqa", "nlvr2")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    paths = ensure_sample_data(tmp_path_factory.mktemp("bad") / "data", num_images=40, seed=5, feat_dim=FEAT_DIM)
    return {"paths": paths, "ft": ensure_finetune_sample(paths), "store": FeatureStore.from_tsv(paths.features_tsv)}


def make_dataset(sample, task, stores=None, tokenizer=None, annotations=None, **kwargs):
    """The data set of `task` on the sample data (or on the given stores / tokenizer / annotation file)."""
    paths, ft = sample["paths"], sample["ft"]
    stores = stores if stores is not None else [sample["store"]]
    tokenizer = tokenizer if tokenizer is not None else paths.tokenizer_dir
    if task == "pretrain":
        return PretrainDataset(annotations or paths.train_json, stores, AnswerTable(paths.answer_table), tokenizer,
                               **kwargs)
    if task == "nlvr2":
        return NLVR2Dataset(annotations or ft.split(task, "train"), stores, tokenizer, **kwargs)
    vocab = AnswerVocab.load(ft.ans2label(task))
    return QADataset(annotations or ft.split(task, "train"), stores, vocab, tokenizer, task=task, **kwargs)


def snapshot(folder):
    """{relative path: sha256} of every file under `folder` (None when the folder does not exist)."""
    if not os.path.exists(folder):
        return None
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def vocab_folder(path, words=()):
    """A tokenizer folder with only these words besides the special tokens (the five-token one is what
    transformers builds for a hub name it cannot reach)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(SPECIALS + list(words)) + "\n")
    return path


# --- tokenizers ----------------------------------------------------------------------------------------------------


def test_an_empty_tokenizer_folder_is_named(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(TokenizerError, match=f"tokenizer folder {tmp_path / 'tok'} holds no tokenizer"):
        load_tokenizer(tmp_path / "tok")


@pytest.mark.parametrize("name", ["{tmp}/tokenizers/bert-base-uncased", "./tok", "a/b/c", "../tok"])
def test_a_missing_tokenizer_folder_is_not_taken_for_a_hub_name(tmp_path, name):
    name = name.format(tmp=tmp_path)
    with pytest.raises(TokenizerError, match="does not exist") as err:
        load_tokenizer(name)
    assert "Repo id" not in str(err.value) and os.path.normpath(name) in os.path.normpath(str(err.value))


def test_a_tokenizer_file_instead_of_a_folder(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(SPECIALS))
    with pytest.raises(TokenizerError, match="is a file; expected a tokenizer folder"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_bert_base_uncased_offline_is_refused_at_once_and_loads_from_the_cache(sample, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as when HF_HUB_OFFLINE is set before the hub loads
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(TokenizerError) as err:
        load_tokenizer("bert-base-uncased")
    assert time.perf_counter() - start < 2  # no retries against an unreachable hub
    message = str(err.value)
    assert "'bert-base-uncased'" in message and "HF_HUB_OFFLINE" in message and "save_pretrained" in message

    # laid out as huggingface_hub caches a download: the name then loads from the cache, offline
    snapshot = tmp_path / "hub" / "models--bert-base-uncased" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    vocab = sample["paths"].tokenizer_dir / "vocab.txt"
    (snapshot / "vocab.txt").write_text(vocab.read_text())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    tokenizer = load_tokenizer("bert-base-uncased")
    assert len(tokenizer) == len(vocab.read_text().split())
    check_tokenizer(tokenizer, ["a red dog on the grass"])


@pytest.mark.parametrize("task", TASKS)
def test_a_five_token_tokenizer_is_refused_with_its_source(sample, tmp_path, task):
    folder = vocab_folder(tmp_path / "five")
    with pytest.raises(TokenizerError) as err:
        make_dataset(sample, task, tokenizer=folder)
    message = str(err.value)
    assert f"folder {folder}" in message and "5 tokens" in message and "[UNK]" in message, message
    assert "bert-base-uncased" in message  # how to get the usual one


@pytest.mark.parametrize("task", TASKS)
def test_a_tokenizer_that_does_not_know_the_words_is_refused(sample, tmp_path, task):
    folder = vocab_folder(tmp_path / "other", ["zebra", "piano", "##qx"])
    with pytest.raises(TokenizerError, match=r"are \[UNK\]") as err:
        make_dataset(sample, task, tokenizer=folder)
    assert str(folder) in str(err.value)


def test_a_tokenizer_without_a_special_token_or_larger_than_the_model(sample, tmp_path):
    from transformers import BertTokenizerFast

    folder = vocab_folder(tmp_path / "nomask", ["a", "dog"])
    other_mask = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), mask_token="<mask>")
    with pytest.raises(TokenizerError, match=r"lacks the special tokens \[MASK\]"):
        check_tokenizer(other_mask, ["a dog"])
    tokenizer = load_tokenizer(sample["paths"].tokenizer_dir)
    with pytest.raises(TokenizerError, match="more tokens than the model's vocab_size=100"):
        check_tokenizer(tokenizer, ["a dog"], vocab_size=100)
    check_tokenizer(tokenizer, ["a red dog on the grass"], vocab_size=len(tokenizer))  # the sample's own is fine


# --- feature files -------------------------------------------------------------------------------------------------


def _image(img_id, seed=0, n=36, obj_max=25, attr_max=10):
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0, 300, n), rng.uniform(0, 200, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, 300, n), y1 + rng.uniform(1, 200, n)], 1)
    return ImageFeatures(img_id, 480, 640, rng.integers(0, obj_max, n), rng.random(n).astype(np.float32),
                         rng.integers(0, attr_max, n), rng.random(n).astype(np.float32), boxes.astype(np.float32),
                         rng.random((n, FEAT_DIM)).astype(np.float32))


def _bad_image(case):
    r = _image("img_bad", seed=3)
    if case == "x2 < x1":
        r.boxes[4, 2] = r.boxes[4, 0] - 1
    elif case == "y2 < y1":
        r.boxes[4, 3] = r.boxes[4, 1] - 1
    else:
        getattr(r, case)[4] = -0.5
    return r


@pytest.mark.parametrize("case", ["x2 < x1", "y2 < y1", "objects_conf", "attrs_conf"])
def test_flipped_boxes_and_negative_confidences_are_refused(tmp_path, case):
    tsv = tmp_path / "feats.tsv"
    write_feature_tsv(tsv, [_image("img_ok", seed=1), _bad_image(case)])
    expected = "x2 < x1 or y2 < y1" if case.startswith(("x2", "y2")) else f"negative confidence(s) in '{case}'"
    with pytest.raises(FeatureFormatError) as err:
        convert_tsv(tsv, progress=False)
    message = str(err.value)
    assert f"{tsv}:2 (img_id 'img_bad')" in message and expected in message and "box 4" in message, message
    assert not default_store_dir(tsv).exists()
    with pytest.raises(FeatureFormatError, match="img_bad"):  # and the TSV reader says the same
        list(read_feature_tsv(tsv))


def _store(path, records):
    write_feature_tsv(path, records)
    return FeatureStore.from_tsv(path, progress=False)


@pytest.mark.parametrize("task", TASKS)
def test_an_img_id_in_two_feature_files_with_different_contents_is_refused(sample, tmp_path, task):
    base = sample["store"]
    img_id = base.img_ids[0]
    same = next(r for r in read_feature_tsv(sample["paths"].features_tsv) if r.img_id == img_id)
    other = _store(tmp_path / "same.tsv", [same])
    make_dataset(sample, task, stores=[base, other])  # the same contents twice: fine, one is used
    changed = ImageFeatures(**{**same.__dict__, "features": same.features + 1.0})
    clash = _store(tmp_path / "clash.tsv", [changed])
    with pytest.raises(FeatureFormatError) as err:
        make_dataset(sample, task, stores=[base, clash])
    message = str(err.value)
    assert repr(img_id) in message and str(sample["paths"].features_tsv) in message, message
    assert str(tmp_path / "clash.tsv") in message


def test_label_ids_beyond_the_model_are_named_with_file_line_and_img_id(tmp_path):
    store = _store(tmp_path / "f.tsv", [_image("a", 1, obj_max=20, attr_max=5), _image("b", 2, obj_max=1600),
                                       _image("c", 3, attr_max=400)])
    assert store.max_label("object")["img_id"] == "b" and store.max_label("attribute")["line"] == 3
    config = LxmertConfig(visual_feat_dim=FEAT_DIM, num_object_labels=1600, num_attr_labels=400)
    check_features([store], config)  # within range
    small = LxmertConfig(visual_feat_dim=FEAT_DIM, num_object_labels=1000, num_attr_labels=400)
    with pytest.raises(ValueError, match=r"f\.tsv:2 \(img_id 'b'\): object label id \d+ is out of range for the "
                                         r"model's num_object_labels=1000"):
        check_features([store], small)
    check_features([store], small, labels=False)  # fine-tuning does not use the labels
    small = LxmertConfig(visual_feat_dim=FEAT_DIM, num_object_labels=1600, num_attr_labels=100)
    with pytest.raises(ValueError, match=r"f\.tsv:3 \(img_id 'c'\): attribute label id \d+ .*num_attr_labels=100"):
        check_features([store], small)


def test_features_narrower_than_the_model_name_the_file(sample):
    with pytest.raises(ValueError, match=f"{sample['paths'].features_tsv}: features have {FEAT_DIM} dimensions, the "
                                         "model's visual_feat_dim is 2048"):
        check_features([sample["store"]], LxmertConfig(), labels=False)


def test_a_store_of_an_older_format_is_converted_again(tmp_path):
    tsv = tmp_path / "f.tsv"
    store = _store(tsv, [_image("a", 1)])
    meta = json.loads((store.store_dir / "meta.json").read_text())
    meta["version"] = 1
    del meta["max_label"]
    (store.store_dir / "meta.json").write_text(json.dumps(meta))
    assert FeatureStore.from_tsv(tsv, progress=False).max_label("object")["img_id"] == "a"


# --- annotations whose image has no features ------------------------------------------------------------------------


def _with_missing_images(sample, task, path):
    """The task's train file plus records of two images that no feature file holds."""
    ft = sample["ft"]
    source = sample["paths"].train_json if task == "pretrain" else ft.split(task, "train")
    records = json.loads(source.read_text())
    for k, img in enumerate(("ghost_1", "ghost_2")):
        record = dict(records[k])
        if task == "nlvr2":
            record.update(identifier=f"ghost-{k}-0-0", img1=img)
        else:
            record["img_id"] = img
            if task != "pretrain":
                record["question_id"] = 10**9 + k
        records.append(record)
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("task", TASKS)
def test_records_whose_image_is_missing_are_named_and_strict_refuses_them(sample, tmp_path, task, caplog):
    path = _with_missing_images(sample, task, tmp_path / "train.json")
    with caplog.at_level("WARNING"):
        data = make_dataset(sample, task, annotations=path, strict=False)
    assert f"{path}: 2 records (img_id 'ghost_1', 'ghost_2')" in caplog.text and "--strict" in caplog.text
    assert str(sample["paths"].features_tsv) in caplog.text
    assert len(data) == len(make_dataset(sample, task))
    with pytest.raises(AnnotationFormatError, match="ghost_1") as err:
        make_dataset(sample, task, annotations=path, strict=True)
    assert str(path) in str(err.value)


# --- JSON files ------------------------------------------------------------------------------------------------------


BROKEN = '[\n  {"ans": "yes", "dsets": ["vqa"]},\n  {"ans": "no" "dsets": []}\n]\n'  # a missing comma: line 3


def _broken(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BROKEN)
    return path


@pytest.mark.parametrize(
    "what, read, expected",
    [
        ("all_ans.json", lambda p: AnswerTable(p), "answer table"),
        ("trainval_ans2label.json", lambda p: AnswerVocab.load(p), "answer vocabulary"),
        ("model.json", load_model_config, "LxmertConfig fields"),
        ("train.json", lambda p: read_annotations(p, "vqa"), "vqa annotation file"),
        ("nlvr2.json", lambda p: read_annotations(p, "nlvr2"), "nlvr2 annotation file"),
    ],
)
def test_broken_json_names_file_line_column_and_what_it_should_be(tmp_path, what, read, expected):
    path = _broken(tmp_path / what)
    with pytest.raises(ValueError) as err:
        read(path)
    assert f"{path}:3:16: not valid JSON" in str(err.value) and expected in str(err.value), str(err.value)


def test_broken_label2ans_is_named(sample, tmp_path):
    ans2label = tmp_path / "trainval_ans2label.json"
    ans2label.write_text(sample["ft"].ans2label("vqa").read_text())
    _broken(tmp_path / "trainval_label2ans.json")
    with pytest.raises(JSONFileError, match=r"trainval_label2ans\.json:3:16: not valid JSON.*a JSON list of answers"):
        AnswerVocab.load(ans2label)


def test_a_model_folder_with_a_broken_config_json_is_named(sample, tmp_path):
    config = LxmertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1, x_layers=1,
                          r_layers=1, visual_feat_dim=FEAT_DIM, vocab_size=100, num_qa_labels=5)
    LxmertForPreTraining(config, backend="torch").save_pretrained(tmp_path / "model")
    weights = snapshot(tmp_path / "model")
    _broken(tmp_path / "model" / "config.json")
    with pytest.raises(JSONFileError, match=r"model/config\.json:3:16: not valid JSON.*a model config"):
        LxmertForPreTraining.from_pretrained(tmp_path / "model")
    with pytest.raises(JSONFileError, match=r"model/config\.json:3:16: not valid JSON"):
        build_task_model("nlvr2", load=tmp_path / "model", backend="torch", log=lambda *a: None)
    with pytest.raises(JSONFileError, match=r"model/config\.json:3:16: not valid JSON"):
        check_model_folder(tmp_path / "model")  # the check a loader runs first
    check_model_folder(tmp_path / "no_such_folder")  # a hub name or a file: the loader's business
    assert snapshot(tmp_path / "model").keys() == weights.keys()


def _tiny_model_folder(path, **save):
    config = LxmertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1, x_layers=1,
                          r_layers=1, visual_feat_dim=FEAT_DIM, vocab_size=100, num_qa_labels=5)
    LxmertForPreTraining(config, backend="torch").save_pretrained(path, **save)
    return path


@pytest.mark.parametrize("cut", [4, 100, -1000])  # inside the length prefix, the header, the tensors
def test_a_truncated_safetensors_file_is_named(tmp_path, cut):
    folder = _tiny_model_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=rf"{weights}: truncated safetensors file .*save or download it again"):
        LxmertForPreTraining.from_pretrained(folder)  # transformers' path: its own message names no file
    with pytest.raises(CheckpointError, match=rf"{weights}: truncated safetensors file"):
        LxmertForPreTraining.from_pretrained(weights)  # lxmert_fast's loader
    assert weights.stat().st_size == len(data[:cut])  # nothing rewritten


def test_a_truncated_shard_of_a_sharded_folder_is_named(tmp_path):
    folder = _tiny_model_folder(tmp_path / "model", max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].write_bytes(shards[-1].read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{shards[-1]}: truncated safetensors file"):
        LxmertForPreTraining.from_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text("[]")  # JSON, but no weight_map
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid shard index"):
        LxmertForPreTraining.from_pretrained(folder)


@pytest.mark.parametrize("state_file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
                                        "state.pt"])
def test_a_checkpoints_model_folder_points_to_export(tmp_path, state_file):
    """A training checkpoint keeps config and tokenizer in model/ and the weights in the engine's state files."""
    checkpoint = tmp_path / "checkpoints" / "step000000008"
    folder = _tiny_model_folder(checkpoint / "model")
    (folder / "model.safetensors").unlink()
    (checkpoint / state_file).write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"python -m lxmert_fast.export {checkpoint} OUT_DIR"):
        LxmertForPreTraining.from_pretrained(folder)


# --- model configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size=30 is not divisible by num_attention_heads=4"),
        ({"hidden_size": 0}, "hidden_size=0 must be an integer >= 1"),
        ({"vocab_size": -5}, "vocab_size=-5 must be an integer >= 1"),
        ({"intermediate_size": 64.5}, "intermediate_size=64.5 must be an integer"),
        ({"l_layers": -1}, "l_layers=-1 must be an integer >= 0"),
        ({"num_attention_heads": 0}, "num_attention_heads=0 must be an integer >= 1"),
        ({"hidden_dropout_prob": 1.5}, r"hidden_dropout_prob=1.5 must be a probability in \[0, 1\)"),
    ],
)
def test_impossible_model_sizes_name_the_field_and_file(tmp_path, fields, message):
    path = tmp_path / "bad_config.json"
    fields = {"hidden_size": 32, "num_attention_heads": 2, **fields}
    path.write_text(json.dumps({"model_type": "lxmert", **fields}))
    with pytest.raises(ConfigError, match=rf"model config {path}: {message}"):
        load_model_config(path)
    try:
        config = LxmertConfig(**fields)
    except Exception as err:  # transformers refuses a float size itself, naming the field
        assert next(iter(set(fields) - {"hidden_size", "num_attention_heads"})) in str(err)
        return
    with pytest.raises(ConfigError, match=message):  # a config built in code is checked before torch sees it
        LxmertForPreTraining(config, backend="torch")
    check_model_sizes(LxmertConfig())  # the defaults are fine


# --- the entry scripts stop before writing anything ------------------------------------------------------------------


@pytest.fixture
def output_dir(tmp_path):
    """An output folder holding an earlier run's checkpoint, which a refused run must leave as it is."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step_5").mkdir(parents=True)
    (out / "checkpoints" / "step_5" / "model.pt").write_bytes(b"earlier weights")
    (out / "checkpoints" / "latest").write_text("step_5")
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    return out


def test_pretraining_refuses_features_of_the_wrong_width_before_writing(sample, output_dir, tmp_path):
    from lxmert_fast import pretrain

    paths = sample["paths"]
    before = snapshot(output_dir)
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        pretrain.main(["--train-json", str(paths.train_json), "--features", str(paths.features_tsv),
                       "--answer-table", str(paths.answer_table), "--tokenizer", str(paths.tokenizer_dir),
                       "--model-config", "lxmert_small", "--output-dir", str(output_dir), "--num-workers", "0",
                       "--resume"])
    assert f"{paths.features_tsv}: features have {FEAT_DIM} dimensions" in str(err.value) and "2048" in str(err.value)
    assert snapshot(output_dir) == before
    assert time.perf_counter() - start < 120
    assert not os.path.exists(output_dir / "run_config.json")


def test_finetuning_refuses_a_five_token_tokenizer_before_writing(sample, output_dir, tmp_path):
    from lxmert_fast import finetune

    ft, paths = sample["ft"], sample["paths"]
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                                "l_layers": 1, "x_layers": 1, "r_layers": 1, "visual_feat_dim": FEAT_DIM}))
    before = snapshot(output_dir)
    for out, extra in ((output_dir, ["--resume"]), (tmp_path / "fresh", [])):
        with pytest.raises(TokenizerError, match=r"5 tokens.*\[UNK\]"):
            finetune.main(["--task", "vqa", "--train", str(ft.split("vqa", "train")), "--valid",
                           str(ft.split("vqa", "valid")), "--features", str(paths.features_tsv), "--ans2label",
                           str(ft.ans2label("vqa")), "--tokenizer", str(vocab_folder(tmp_path / "five")),
                           "--from-scratch", "--model-config", str(tiny), "--output-dir", str(out),
                           "--num-workers", "0", *extra])
    assert snapshot(output_dir) == before and not (tmp_path / "fresh").exists()


def test_the_command_reports_a_refused_input_in_one_line(sample, tmp_path):
    paths = sample["paths"]
    (tmp_path / "empty_tokenizer").mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "lxmert_fast", "pretrain.py"), "--train-json", str(paths.train_json),
         "--features", str(paths.features_tsv), "--answer-table", str(paths.answer_table), "--tokenizer",
         str(tmp_path / "empty_tokenizer"), "--output-dir", str(tmp_path / "out"), "--num-workers", "0"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo), cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"tokenizer folder {tmp_path / 'empty_tokenizer'} holds no tokenizer" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
