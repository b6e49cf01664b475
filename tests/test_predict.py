"""Prediction and evaluation-only: lxmert_fast.use (the Predictor, scoring a model folder), and the commands
lxmert_fast.predict and lxmert_fast.evaluate.

A tiny model (hidden 32, 32-d features) is fine-tuned for a few dozen steps on the generated VQA / GQA / NLVR2
sample data and saved as fine-tuning saves a model folder: weights, config with id2label, tokenizer.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from lxmert_fast import LxmertConfig
from lxmert_fast.data import FeatureStore, ensure_sample_data
from lxmert_fast.data.finetune_dataset import AnswerVocab, NLVR2Dataset, QADataset, finetune_collate
from lxmert_fast.data.finetune_sample import ensure_finetune_sample
from lxmert_fast.errors import PredictionError
from lxmert_fast.model.folder import LABEL2ANS_FILE
from lxmert_fast.tasks.registry import TASKS
from lxmert_fast.tasks.scoring import evaluate, read_submission
from lxmert_fast.train.objectives import MODEL_INPUTS, task_loss
from lxmert_fast.use.predictor import Predictor, submission_predictions

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1, x_layers=1, r_layers=1,
            visual_feat_dim=32, max_position_embeddings=32, num_object_labels=25, num_attr_labels=10)


def finetune_tiny(task, ft, store, out_dir, steps=40, batch_size=32):
    """A few Adam steps on the task's sample train split; saved with id2label (QA) and the tokenizer."""
    torch.manual_seed(0)
    vocab = AnswerVocab.load(ft.ans2label(task)) if task != "nlvr2" else None
    if vocab is None:
        data = NLVR2Dataset(ft.split(task, "train"), [store], ft.tokenizer_dir)
    else:
        data = QADataset(ft.split(task, "train"), [store], vocab, ft.tokenizer_dir, task)
    config = LxmertConfig(vocab_size=len(data.tokenizer), num_qa_labels=len(vocab) if vocab else 2, **TINY)
    if vocab is not None:
        config.id2label = dict(enumerate(vocab.label2ans))
        config.label2id = dict(vocab.ans2label)
    model = TASKS[task].model_class(config, backend="torch")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=finetune_collate,
                                         generator=generator)
    step = 0
    while step < steps:
        for batch in loader:
            out = model(**{k: batch[k] for k in MODEL_INPUTS}, return_dict=True)
            logits = out.logits if task == "nlvr2" else out.question_answering_score
            task_loss(task, logits, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    model.save_pretrained(out_dir)
    data.tokenizer.save_pretrained(str(out_dir))
    return out_dir


def small_sample(root):
    """(paths, fine-tuning paths, feature store) of a small sample under root/sample_data (150 images, 32 features)."""
    paths = ensure_sample_data(root / "sample_data", num_images=150, feat_dim=32)
    return paths, ensure_finetune_sample(paths), FeatureStore.from_tsv(paths.features_tsv, progress=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    paths, ft, store = small_sample(root)
    return {"root": root, "paths": paths, "ft": ft, "store": store, "models": TinyModels(root, ft, store),
            "tsv": str(paths.features_tsv)}


class TinyModels(dict):
    """task -> model folder, fine-tuned on first use (NLVR2's pairs cost two passes: fewer, smaller steps)."""

    def __init__(self, root, ft, store):
        super().__init__()
        self.root, self.ft, self.store = root, ft, store

    def __missing__(self, task):
        steps, batch = (20, 16) if task == "nlvr2" else (40, 32)
        self[task] = finetune_tiny(task, self.ft, self.store, self.root / f"finetune_{task}" / "best_model", steps,
                                   batch)
        return self[task]


def read(path):
    return json.loads(Path(path).read_text())


def test_qa_predictions_are_the_models_argmax_and_sigmoid(sample):
    """Batched, length-sorted prediction gives every question the answer and score of its own forward pass."""
    ft = sample["ft"]
    predictor = Predictor.from_pretrained(sample["models"]["vqa"], sample["tsv"], batch_size=7, device="cpu")
    records = read(ft.split("vqa", "valid"))[:20]
    results = predictor.predict(records)
    vocab = AnswerVocab.load(ft.ans2label("vqa"))
    data = QADataset(ft.split("vqa", "valid"), [sample["store"]], vocab, ft.tokenizer_dir)
    batch = finetune_collate([data[i] for i in range(20)])
    with torch.no_grad():
        logits = predictor.model(**{k: batch[k] for k in MODEL_INPUTS}).question_answering_score
    assert [r["question_id"] for r in results] == [r["question_id"] for r in records]
    assert [r["answer"] for r in results] == [vocab.label2ans[i] for i in logits.argmax(1).tolist()]
    expected = logits.max(1).values.sigmoid()
    assert torch.allclose(torch.tensor([r["score"] for r in results]), expected, atol=1e-5)
    assert predictor.task is None and predictor.is_qa  # VQA or GQA: the folder does not say which


def test_top_k_is_ordered_and_starts_with_the_answer(sample):
    predictor = Predictor.from_pretrained(sample["models"]["gqa"], sample["tsv"], device="cpu")
    records = read(sample["ft"].split("gqa", "valid"))[:5]
    for result in predictor.predict(records, top_k=4):
        scores = [e["score"] for e in result["top_k"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert result["top_k"][0] == {"answer": result["answer"], "score": result["score"]}
        assert len({e["answer"] for e in result["top_k"]}) == 4
    with pytest.raises(PredictionError, match="top_k"):
        predictor.predict(records, top_k=0)


def test_typed_question_equals_the_same_question_in_a_file(sample):
    predictor = Predictor.from_pretrained(sample["models"]["vqa"], sample["tsv"], device="cpu")
    record = read(sample["ft"].split("vqa", "valid"))[3]
    typed = predictor.ask(record["sent"], record["img_id"], top_k=2)
    in_file = predictor.predict(read(sample["ft"].split("vqa", "valid"))[:8], top_k=2)[3]
    assert typed["answer"] == in_file["answer"] and typed["img_id"] == record["img_id"]
    assert typed["score"] == pytest.approx(in_file["score"], abs=1e-5)


def test_nlvr2_pair_prediction(sample):
    predictor = Predictor.from_pretrained(sample["models"]["nlvr2"], sample["tsv"], device="cpu")
    assert predictor.task == "nlvr2"
    records = read(sample["ft"].split("nlvr2", "valid"))[:12]
    results = predictor.predict(records)
    data = NLVR2Dataset(sample["ft"].split("nlvr2", "valid"), [sample["store"]], sample["ft"].tokenizer_dir)
    batch = finetune_collate([data[i] for i in range(12)])
    with torch.no_grad():
        probs = predictor.model(**{k: batch[k] for k in MODEL_INPUTS}).logits.softmax(-1)
    assert [r["prediction"] for r in results] == (probs[:, 1] > probs[:, 0]).tolist()
    assert torch.allclose(torch.tensor([r["score"] for r in results]), probs.max(1).values, atol=1e-5)
    one = predictor.judge(records[2]["sent"], records[2]["img0"], records[2]["img1"])
    assert one["prediction"] == results[2]["prediction"] and one["img1"] == records[2]["img1"]
    swapped = predictor.judge(records[2]["sent"], records[2]["img1"], records[2]["img0"])
    assert swapped["score"] != pytest.approx(one["score"], abs=1e-7)  # left and right are not interchangeable


def test_cli_writes_json_for_a_file_and_prints_a_typed_question(sample, tmp_path, capsys):
    from lxmert_fast.predict import main

    model, tsv = str(sample["models"]["vqa"]), sample["tsv"]
    questions = sample["ft"].split("vqa", "test")  # no labels
    out = tmp_path / "preds.json"
    main(["--model", model, "--features", tsv, "--questions", str(questions), "--top-k", "3", "--out", str(out),
          "--device", "cpu"])
    preds = read(out)
    assert len(preds) == len(read(questions))
    assert set(preds[0]) == {"question_id", "img_id", "question", "answer", "score", "top_k"}
    assert len(preds[0]["top_k"]) == 3
    capsys.readouterr()
    record = read(questions)[0]
    main(["--model", model, "--features", tsv, "--img-id", record["img_id"], "--question", record["sent"],
          "--device", "cpu"])
    typed = json.loads(capsys.readouterr().out)
    assert typed["answer"] == preds[0]["answer"] and "top_k" not in typed
    nlvr2 = read(sample["ft"].split("nlvr2", "valid"))[0]
    main(["--model", str(sample["models"]["nlvr2"]), "--features", tsv, "--img-ids", nlvr2["img0"], nlvr2["img1"],
          "--statement", nlvr2["sent"], "--device", "cpu"])
    assert isinstance(json.loads(capsys.readouterr().out)["prediction"], bool)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--img-id", "sample_nope", "--question", "what is it?"], r"image 'sample_nope' is not in the feature files"),
        (["--img-ids", "a", "b", "--statement", "x"], r"is a VQA / GQA question-answering model; give it --question"),
        (["--questions", "NLVR2"], r"holds NLVR2 statements .* but .* is a VQA / GQA question-answering model"),
        (["--questions", "VQA", "--task", "nlvr2"], r"task 'nlvr2' does not fit"),
        (["--question", "what?"], r"--question needs one of --img-id \(in --features\) or --image"),
    ],
)
def test_cli_errors_name_what_is_wrong(sample, argv, message, capsys):
    from lxmert_fast.cli import run
    from lxmert_fast.predict import main

    files = {"NLVR2": str(sample["ft"].split("nlvr2", "valid")), "VQA": str(sample["ft"].split("vqa", "valid"))}
    argv = [files.get(a, a) for a in argv]
    with pytest.raises(SystemExit):  # as the command runs it: one line on stderr, exit status 2
        run(main, ["--model", str(sample["models"]["vqa"]), "--features", sample["tsv"], "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert re.search(message, err), err
    if "sample_nope" in argv:
        assert sample["tsv"] in err  # the feature file is named


def test_answers_from_label2ans_beside_the_model_or_a_file(sample, tmp_path):
    """Folders from before id2label: label2ans.json beside the weights, or answers=FILE; neither is an error."""
    src = sample["models"]["vqa"]
    folder = tmp_path / "old_model"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = read(folder / "config.json")
    answers = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    config.pop("id2label"), config.pop("label2id")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PredictionError, match=r"no answer list.*--answers trainval_label2ans.json"):
        Predictor.from_pretrained(folder, sample["tsv"], device="cpu")
    record = read(sample["ft"].split("vqa", "valid"))[0]
    expected = Predictor.from_pretrained(src, sample["tsv"], device="cpu").ask(record["sent"], record["img_id"])
    ans2label = sample["ft"].ans2label("vqa")  # the {answer: index} form also works
    from_file = Predictor.from_pretrained(folder, sample["tsv"], answers=ans2label, device="cpu")
    assert from_file.ask(record["sent"], record["img_id"]) == expected
    (folder / LABEL2ANS_FILE).write_text(json.dumps(answers))
    assert Predictor.from_pretrained(folder, sample["tsv"], device="cpu").ask(record["sent"], record["img_id"]) == (
        expected
    )
    with pytest.raises(PredictionError, match=r"3 answers, but the model .* has \d+ output rows"):
        Predictor.from_pretrained(folder, sample["tsv"], answers=["a", "b", "c"], device="cpu")


def test_folder_without_tokenizer_or_not_fine_tuned(sample, tmp_path):
    src = sample["models"]["nlvr2"]
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((src / name).read_bytes())
    with pytest.raises(PredictionError, match=r"no tokenizer .*--tokenizer"):
        Predictor.from_pretrained(folder, sample["tsv"], device="cpu")
    assert Predictor.from_pretrained(folder, sample["tsv"], tokenizer=sample["ft"].tokenizer_dir, device="cpu")
    config = read(folder / "config.json")
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LxmertForPreTraining"]}))
    with pytest.raises(PredictionError, match="not a model fine-tuned"):
        Predictor.from_pretrained(folder, sample["tsv"], tokenizer=sample["ft"].tokenizer_dir, device="cpu")


def test_hub_id_read_from_the_local_hub_cache(sample, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout (offline: nothing is downloaded)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--unc-nlp--lxmert-vqa-uncased" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    src = sample["models"]["vqa"]
    config = read(src / "config.json")
    config.pop("id2label"), config.pop("label2id")  # as on the hub: no answer list
    (snapshot / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():  # the weights and the tokenizer's files
        if f.name != "config.json":
            (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--unc-nlp--lxmert-vqa-uncased" / "refs").mkdir()
    (cache / "models--unc-nlp--lxmert-vqa-uncased" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    predictor = Predictor.from_pretrained("unc-nlp/lxmert-vqa-uncased", sample["tsv"],
                                          answers=sample["ft"].label2ans("vqa"), device="cpu")
    record = read(sample["ft"].split("vqa", "valid"))[0]
    expected = Predictor.from_pretrained(src, sample["tsv"], device="cpu").ask(record["sent"], record["img_id"])
    assert predictor.ask(record["sent"], record["img_id"]) == expected
    with pytest.raises(PredictionError, match="not found on the hub or in its cache"):
        Predictor.from_pretrained("unc-nlp/not-there", sample["tsv"], device="cpu")


@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr2"])
def test_evaluate_scores_as_evaluation_py_and_writes_the_submission(sample, tmp_path, task, capsys):
    from lxmert_fast.evaluate import main

    ft = sample["ft"]
    valid = ft.split(task, "valid")
    submission = tmp_path / "submission"
    argv = ["--model", str(sample["models"][task]), "--features", sample["tsv"], "--annotations", str(valid),
            "--submission", str(submission), "--device", "cpu", "--batch-size", "16"]
    if task != "nlvr2":
        argv += ["--task", task]
    result = main(argv)
    printed = json.loads(capsys.readouterr().out)
    records = read(valid)
    id_key = "identifier" if task == "nlvr2" else "question_id"
    labels = {r[id_key]: r["label"] for r in records}
    predictor = Predictor.from_pretrained(sample["models"][task], sample["tsv"], device="cpu")
    predictions = submission_predictions(task, predictor.predict(records))
    expected = evaluate(task, predictions, labels)
    assert result["metrics"] == pytest.approx(expected) and printed["eval_score"] == pytest.approx(
        expected["eval_score"])
    assert read_submission(task, submission) == result["predictions"] == predictions
    if task == "nlvr2":
        assert set(expected) == {"eval_score", "accuracy", "consistency"}


def test_evaluate_test_split_without_labels_writes_only_the_submission(sample, tmp_path, capsys):
    from lxmert_fast.evaluate import main

    test = sample["ft"].split("gqa", "test")
    result = main(["--model", str(sample["models"]["gqa"]), "--features", sample["tsv"], "--annotations", str(test),
                   "--submission", str(tmp_path / "submit.json"), "--device", "cpu"])
    assert result["metrics"] is None and result["task"] == "gqa"  # string question ids: GQA
    assert len(read_submission("gqa", tmp_path / "submit.json")) == len(read(test))
    assert "nothing to score" in capsys.readouterr().err


def test_fast_mode_runs_and_stays_close_to_exact(sample):
    ft = sample["ft"]
    # every question of the sample (the validation split alone holds 19: one answer would be 5%)
    records = read(ft.split("vqa", "train")) + read(ft.split("vqa", "valid"))
    exact = Predictor.from_pretrained(sample["models"]["vqa"], sample["tsv"], device="cpu")
    fast = Predictor.from_pretrained(sample["models"]["vqa"], sample["tsv"], device="cpu", fast=True)
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    assert not any(type(m) is torch.nn.Linear for m in fast.model.modules())
    assert sum(isinstance(m, Int8Linear) for m in fast.model.modules()) == sum(
        type(m) is torch.nn.Linear for m in exact.model.modules())  # every linear layer; the exact model untouched
    a, b = exact.predict(records, top_k=2), fast.predict(records, top_k=2)
    error = max(abs(x["score"] - y["score"]) for x, y in zip(a, b, strict=True))
    assert error < 0.1, error
    # answers change only between near-tied answers: the exact model's two best lie within fast mode's error (the
    # tiny sample model's answers are all near-tied, so a share of agreement would measure the ties, not int8)
    flipped = [x for x, y in zip(a, b, strict=True) if x["answer"] != y["answer"]]
    assert all(x["top_k"][0]["score"] - x["top_k"][1]["score"] <= 2 * error for x in flipped), flipped[:3]
    labels = {r["question_id"]: r["label"] for r in records}
    scores = [evaluate("vqa", submission_predictions("vqa", p), labels)["eval_score"] for p in (a, b)]
    assert abs(scores[0] - scores[1]) <= 0.05, scores


def test_packing_choice_does_not_change_answers(sample):
    """Whether a batch's padding is packed away depends on how much there is; the results never do."""
    predictor = Predictor.from_pretrained(sample["models"]["vqa"], sample["tsv"], device="cpu", batch_size=64)
    records = read(sample["ft"].split("vqa", "valid"))[:64]
    import lxmert_fast.use.predictor as predict_module

    results = {}
    for threshold in (0.0, 1.1):  # always pack, never pack
        predict_module.PACK_MIN_PADDING = threshold
        try:
            results[threshold] = predictor.predict(records)
        finally:
            predict_module.PACK_MIN_PADDING = 0.2
    for x, y in zip(results[0.0], results[1.1], strict=True):
        assert x["answer"] == y["answer"] and x["score"] == pytest.approx(y["score"], abs=1e-5)


def readme_commands(section="## Use a trained model", programs=("lxmert_fast.predict", "lxmert_fast.evaluate")):
    """The README section's `python -m <program> ...` commands on the sample data (continuation lines joined)."""
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    body = text[start : end if end > 0 else None]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if any(line.startswith(f"python -m {p} ") for p in programs) and "sample_data/" in line:
                commands.append(shlex.split(line))
    return commands


def test_readme_prediction_and_evaluation_commands_run(sample, tmp_path, monkeypatch, capsys):
    """The README's predict / evaluate commands, verbatim, in a folder laid out as after its fine-tuning command
    (the sample data, and a fine-tuned model where finetune.py puts it; tiny here, for speed)."""
    import importlib

    commands = readme_commands()
    assert {c[2] for c in commands} == {"lxmert_fast.predict", "lxmert_fast.evaluate"}, commands
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_data").symlink_to(sample["paths"].root)
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "finetune_vqa").symlink_to(sample["models"]["vqa"].parent)
    for command in commands:
        importlib.import_module(command[2]).main(command[3:])
        assert capsys.readouterr().out.strip()
