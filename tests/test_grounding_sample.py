"""The question-only baseline, and a fine-tuning sample whose answers need the image."""

import json

import numpy as np
import pytest

from lxmert_fast.data import FeatureStore, ensure_sample_data
from lxmert_fast.data.finetune_sample import _image_contents, ensure_finetune_sample
from lxmert_fast.data.sample import ATTRIBUTE_NAMES, OBJECT_NAMES, OBJECTS
from lxmert_fast.tasks.scoring import question_only_note, question_only_score


def vqa(qid, sent, label, question_type):
    return {"question_id": qid, "img_id": "i", "sent": sent, "label": label, "question_type": question_type}


def test_question_only_answers_by_question_then_type_then_overall():
    train = [
        vqa(1, "is there a dog?", {"yes": 1.0}, "is there a"),
        vqa(2, "is there a dog?", {"yes": 1.0}, "is there a"),
        vqa(3, "is there a cat?", {"no": 1.0}, "is there a"),
        vqa(4, "is there a cow?", {"no": 1.0, "yes": 0.3}, "is there a"),
        vqa(5, "what color is it?", {"red": 1.0, "blue": 0.6}, "what color"),
        vqa(6, "what color is the sky?", {"blue": 1.0}, "what color"),
    ]
    valid = [
        vqa(11, "Is there a dog? ", {"yes": 1.0}, "is there a"),  # seen text (case and spaces aside): "yes"
        vqa(12, "is there a cat?", {"yes": 1.0}, "is there a"),  # seen: "no", wrong
        vqa(13, "is there a bird?", {"no": 1.0}, "is there a"),  # unseen: the type's best, "yes" (2.3 vs 2.0)
        vqa(14, "what color is the car?", {"blue": 0.3, "red": 1.0}, "what color"),  # the type's: blue (1.6)
        vqa(15, "how many?", {"2": 1.0}, "how many"),  # unseen type: the overall best, "yes"
    ]
    # per question, backing off: 1 + 0 + 0 + 0.3 + 0 = 1.3; per type ("yes" for all three "is there a"): 2.3
    score, key = question_only_score("vqa", train, valid)
    assert (score, key) == (pytest.approx(2.3 / 5), "question type")
    # an answer the model cannot give never wins: "no" for every "is there a" question, and overall
    score, key = question_only_score("vqa", train, valid, answers=["no", "red", "blue"])
    assert score == pytest.approx((0 + 0 + 1 + 0.3 + 0) / 5)


def test_question_only_for_nlvr2_is_the_majority_per_statement():
    def pair(identifier, sent, label):
        return {"identifier": identifier, "img0": "a", "img1": "b", "sent": sent, "label": label}

    train = [pair("t-0-0-0", "one dog", 1), pair("t-0-0-1", "one dog", 1), pair("t-1-0-0", "two cats", 0)]
    valid = [pair("v-0-0-0", "one dog", 1), pair("v-0-0-1", "one dog", 0), pair("v-1-0-0", "a bird", 1)]
    assert question_only_score("nlvr2", train, valid) == (pytest.approx(2 / 3), "question")


def test_note_is_empty_without_labels_on_either_side():
    train = [vqa(1, "q?", {"yes": 1.0}, "t")]
    assert question_only_note("vqa", None, train) == ""
    assert question_only_note("vqa", train, [{"question_id": 2, "img_id": "i", "sent": "q?"}]) == ""
    assert question_only_note("vqa", train, train) == " (question only: 1.0000, the best training answer per question)"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    paths = ensure_sample_data(tmp_path_factory.mktemp("grounding") / "sample_data", num_images=40, feat_dim=32)
    return paths, ensure_finetune_sample(paths)


def test_sample_answers_follow_from_the_image(sample):
    """Every presence and colour answer is a fact about the image's boxes, and presence questions are as often
    "yes" as "no": the question alone cannot tell the answer, the image can."""
    paths, ft = sample
    store = FeatureStore.from_tsv(paths.features_tsv, progress=False)
    names = {**{n: k for k, n in enumerate(OBJECT_NAMES)}, **{p: k for k, (_, p) in enumerate(OBJECTS)}}
    answers = {"yes": 0, "no": 0}
    for split in ("train", "valid"):
        for r in json.load(open(ft.split("vqa", split))):
            contents = _image_contents(store, r["img_id"])
            best = max(r["label"], key=r["label"].get)
            words = r["sent"].rstrip("?").split()
            if r["question_type"] in ("is there a", "are there"):
                obj = names[words[3]]  # "is there a dog in the picture" / "are there any dogs"
                assert best == ("yes" if obj in contents else "no"), r
                answers[best] += 1
            elif r["question_type"] == "what color is the":
                assert best == ATTRIBUTE_NAMES[contents[names[words[-1]]]], r
    assert answers["yes"] == answers["no"] > 20


def test_sample_nlvr2_statements_hold_for_their_pair_of_two_images(sample):
    """Each NLVR2 label is the statement's truth about the pair's boxes, and a pair shows two different images (as
    NLVR2's do: a pair of one image twice would make left and right the same) where the split has enough images
    (here the training split's 36; the validation split's 4 may not)."""
    paths, ft = sample
    store = FeatureStore.from_tsv(paths.features_tsv, progress=False)
    names = {n: k for k, n in enumerate(OBJECT_NAMES)}
    truth = {"there is a": lambda a, b: a and b, "exactly one image": lambda a, b: a != b,
             "the left image": lambda a, b: a and not b, "neither image contains": lambda a, b: not a and not b,
             "at least one": lambda a, b: a or b}
    for split in ("train", "valid"):
        pairs = json.load(open(ft.split("nlvr2", split)))
        for r in pairs:
            obj = names[next(w for w in r["sent"].split() if w in names)]
            a, b = (obj in _image_contents(store, r[key]) for key in ("img0", "img1"))
            rule = next(f for start, f in truth.items() if r["sent"].startswith(start))
            assert r["label"] == int(rule(a, b)), r
        assert split == "valid" or all(r["img0"] != r["img1"] for r in pairs)


def test_short_run_prints_the_question_only_score_beside_its_own(sample, tmp_path, capsys):
    from lxmert_fast.finetune import main

    paths, ft = sample
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(
            {"model_type": "lxmert", "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
             "l_layers": 1, "x_layers": 1, "r_layers": 1, "max_position_embeddings": 32}
        )
    )  # fmt: skip
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 0}}))
    main(
        ["--task", "vqa", "--train", str(ft.split("vqa", "train")), "--valid", str(ft.split("vqa", "valid")),
         "--features", str(paths.features_tsv), "--tokenizer", str(paths.tokenizer_dir),
         "--ans2label", str(ft.ans2label("vqa")), "--from-scratch", "--model-config", str(config),
         "--deepspeed_config", str(ds), "--max-steps", "1", "--output-dir", str(tmp_path / "out"),
         "--num-workers", "0", "--images-shuffled-score"]
    )  # fmt: skip
    train, valid = (json.load(open(ft.split("vqa", s))) for s in ("train", "valid"))
    expected, key = question_only_score("vqa", train, valid, json.load(open(ft.label2ans("vqa"))))
    out = capsys.readouterr().out
    evals = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl") if '"eval"' in line]
    shuffled = next(r["eval_score"] for r in evals if r["split"] == "valid_images_shuffled")
    note = (f"(question only: {expected:.4f}, the best training answer per {key}) "
            f"(images shuffled between questions: {shuffled:.4f})")
    lines = [line for line in out.splitlines() if line.startswith("valid after step 1: eval_score")]
    assert len(lines) == 1 and lines[0].endswith(note), out


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_images_shuffled_copy_gives_every_record_another_image_of_the_set(sample, task):
    from lxmert_fast.data.finetune_dataset import AnswerVocab, NLVR2Dataset, QADataset

    paths, ft = sample
    store = FeatureStore.from_tsv(paths.features_tsv, progress=False)
    if task == "vqa":
        data = QADataset(ft.split("vqa", "valid"), [store], AnswerVocab.load(ft.ans2label("vqa")), paths.tokenizer_dir)
        images = {(0, store.row(r["img_id"])) for r in data.records}
        own = [((0, store.row(r["img_id"])),) for r in data.records]
    else:
        data = NLVR2Dataset(ft.split("nlvr2", "valid"), [store], paths.tokenizer_dir)
        images = {(0, store.row(r[k])) for r in data.records for k in ("img0", "img1")}
        own = [((0, store.row(r["img0"])), (0, store.row(r["img1"]))) for r in data.records]
    shuffled = data.with_images_shuffled()
    assert len(shuffled) == len(data) and shuffled.labels == data.labels
    swapped = [entry if task == "nlvr2" else (entry,) for entry in shuffled._images]
    for mine, theirs in zip(own, swapped, strict=True):
        assert all(a != b and b in images for a, b in zip(mine, theirs, strict=True))
    k = 3
    feats = shuffled[k]["visual_feats"]  # (V, F), NLVR2 (2, V, F): the left image first
    assert np.array_equal(feats if task == "vqa" else feats[0], store.features[swapped[k][0][1]].astype(np.float32))
    assert np.array_equal(shuffled[k]["input_ids"], data[k]["input_ids"])
    assert data._images[k] == (own[k] if task == "nlvr2" else own[k][0])  # the original is left as it was


def _schedule(config):
    return config.optimisation.optimizer, config.optimisation.lr, config.run.epochs


def test_sample_mode_trains_from_scratch_on_the_sample_schedule_unless_told_otherwise(tmp_path):
    from lxmert_fast.finetune import SAMPLE_SCHEDULE, resolve

    sample_dir = str(tmp_path / "sample_data")
    config = resolve(["--task", "vqa", "--sample-data-dir", sample_dir])
    assert config.task.from_scratch and config.task.images_shuffled_score
    assert _schedule(config) == ("adamw", 5e-4, 30) == tuple(SAMPLE_SCHEDULE.values())
    assert config.model["hidden_size"] == 128  # lxmert_small
    assert any(note.startswith("sample data: --from-scratch, --optimizer adamw") for note in config.adjustments)

    given = resolve(["--task", "gqa", "--sample-data-dir", sample_dir, "--optimizer", "bertadam", "--lr", "1e-4"])
    assert (*_schedule(given), given.task.from_scratch) == ("bertadam", 1e-4, 30, True)
    assert any(note.startswith("sample data: --from-scratch, --epochs 30 (") for note in given.adjustments)

    loaded = resolve(["--task", "nlvr2", "--sample-data-dir", sample_dir, "--load", sample_dir])
    assert (*_schedule(loaded), loaded.task.from_scratch) == ("bertadam", 5e-5, 4, False)
    assert not any(note.startswith("sample data") for note in loaded.adjustments)

    real = resolve(["--task", "vqa", "--train", str(tmp_path / "sample_data" / "finetune" / "vqa" / "train.json"),
                    "--features", str(tmp_path / "sample_data" / "sample_imgfeat" / "sample_obj36.tsv"),
                    "--ans2label", str(tmp_path / "sample_data" / "finetune" / "vqa" / "trainval_ans2label.json"),
                    "--tokenizer", str(tmp_path / "sample_data" / "tokenizer"), "--from-scratch"])
    assert (*_schedule(real), real.task.images_shuffled_score) == ("bertadam", 5e-5, 4, False)
