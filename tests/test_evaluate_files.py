"""Scoring a predictions file without a model (python -m lxmert_fast.evaluate --predictions): the three tasks'
submission formats as the project writes them, scored on the project's annotation files like a model folder's
predictions, and VQA's official accuracy (the evaluation server's) beside the original's soft score."""

import json

import pytest

from lxmert_fast.cli import run
from lxmert_fast.evaluate import main
from lxmert_fast.tasks.scoring import evaluate, write_submission
from lxmert_fast.tasks.vqa_official import official_accuracy, read_official_annotations

VQA = [
    {"question_id": 11, "img_id": "a", "sent": "how many dogs?", "label": {"2": 1.0, "3": 0.3}},
    {"question_id": 12, "img_id": "a", "sent": "what color is it?", "label": {"red": 0.6}},
    {"question_id": 13, "img_id": "b", "sent": "is there a cat?", "label": {"yes": 1.0}},
]
GQA = [
    {"question_id": "0001", "img_id": "a", "sent": "what is red?", "label": {"dog": 1.0}},
    {"question_id": "0002", "img_id": "b", "sent": "is the cat red?", "label": {"no": 1.0}},
]
NLVR2 = [  # two sentences of two pairs each
    {"identifier": f"dev-7-{pair}-{sentence}", "img0": "a", "img1": "b", "sent": f"statement {sentence}",
     "label": label}
    for (pair, sentence), label in zip([(0, 0), (1, 0), (0, 1), (1, 1)], [1, 0, 1, 1], strict=True)
]
PREDICTIONS = {
    "vqa": {11: "3", 12: "red", 13: "yes"},
    "gqa": {"0001": "dog", "0002": "yes"},
    "nlvr2": {"dev-7-0-0": 1, "dev-7-1-0": 1, "dev-7-0-1": 1, "dev-7-1-1": 1},
}
EXPECTED = {  # by hand: the soft scores 0.3, 0.6, 1.0; one GQA answer right; NLVR2 3 of 4 pairs, 1 of 2 sentences
    "vqa": {"eval_score": pytest.approx(1.9 / 3), "vqa_score": pytest.approx(1.9 / 3)},
    "gqa": {"eval_score": 0.5, "accuracy": 0.5},
    "nlvr2": {"eval_score": 0.75, "accuracy": 0.75, "consistency": 0.5},
}
FILES = {"vqa": "test_predict.json", "gqa": "submit_predict.json", "nlvr2": "test_predict.csv"}


def write_annotations(tmp_path, records, name="valid.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr2"])
def test_a_submission_file_is_scored_as_the_models_predictions_would_be(tmp_path, task, capsys):
    records = {"vqa": VQA, "gqa": GQA, "nlvr2": NLVR2}[task]
    predictions = write_submission(task, PREDICTIONS[task], tmp_path / FILES[task])
    result = main(["--predictions", str(predictions), "--annotations", write_annotations(tmp_path, records)])
    printed = json.loads(capsys.readouterr().out)
    assert result["task"] == task  # told by the file's format alone
    assert result["metrics"] == EXPECTED[task] and printed == {"task": task, "records": len(records),
                                                               "labelled": len(records), **EXPECTED[task]}
    id_key = "identifier" if task == "nlvr2" else "question_id"
    assert result["metrics"] == evaluate(task, PREDICTIONS[task], {r[id_key]: r["label"] for r in records})


def test_records_without_a_prediction_are_counted_not_scored(tmp_path, capsys):
    predictions = write_submission("vqa", {13: "yes"}, tmp_path / "part.json")
    result = main(["--predictions", str(predictions), "--annotations", write_annotations(tmp_path, VQA),
                   "--metrics-out", str(tmp_path / "metrics.json")])
    assert result["metrics"]["vqa_score"] == 1.0 and result["unpredicted"] == 2
    assert "2 annotated records without a prediction in" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.json").read_text())["unpredicted"] == 2


def official_files(tmp_path):
    """The official layout for VQA's three questions: ten human answers each, and the question file."""
    humans = {11: ["2"] * 6 + ["3"] * 4, 12: ["red"] * 2 + ["dark red"] * 8, 13: ["yes"] * 10, 99: ["no"] * 10}
    annotations = [{"question_id": qid, "answer_type": "other", "question_type": "what",
                    "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(texts)]}
                   for qid, texts in humans.items()]
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": annotations}))
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": q} for q in humans]}))
    return str(tmp_path / "ann.json"), str(tmp_path / "q.json")


def test_the_official_vqa_accuracy_beside_the_soft_score(tmp_path, capsys):
    annotations, questions = official_files(tmp_path)
    predictions = write_submission("vqa", PREDICTIONS["vqa"], tmp_path / "test_predict.json")
    result = main(["--predictions", str(predictions), "--annotations", write_annotations(tmp_path, VQA),
                   "--vqa-annotations", annotations, "--vqa-questions", questions])
    printed = json.loads(capsys.readouterr().out)
    # "3": 4 of 10 humans -> 1.0 (every leave-one-out subset has >= 3); "red": 2 -> (8 * 2/3 + 2 * 1/3) / 10
    expected = official_accuracy(PREDICTIONS["vqa"], read_official_annotations(annotations)[:3])
    assert result["official"] == {**expected, "annotated": 4}  # question 99 is not predicted: not scored
    assert expected["overall"] == pytest.approx(round(100 * (1.0 + 0.6 + 1.0) / 3, 2))
    assert printed["vqa_score"] == pytest.approx(1.9 / 3) and printed["official"]["overall"] == expected["overall"]
    assert "perQuestionType" not in printed["official"]
    # only the official files: the official accuracy alone
    alone = main(["--predictions", str(predictions), "--vqa-annotations", annotations])
    assert alone["metrics"] is None and alone["official"]["overall"] == expected["overall"]


def errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv, prog="evaluate")
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_files_that_do_not_fit_are_one_line_naming_the_file(tmp_path, capsys):
    vqa = write_annotations(tmp_path, VQA)
    gqa_predictions = write_submission("gqa", {"0009": "dog"}, tmp_path / "submit_predict.json")
    assert "submit_predict.json: 1 prediction of ids in none of the annotation files" in errors(
        ["--predictions", str(gqa_predictions), "--annotations", write_annotations(tmp_path, GQA, "gqa.json")], capsys)
    (tmp_path / "odd.json").write_text(json.dumps([{"qid": 1, "ans": "x"}]))
    assert "odd.json: not a predictions file of a known format (entry 0 has keys ['ans', 'qid'])" in errors(
        ["--predictions", str(tmp_path / "odd.json"), "--annotations", vqa], capsys)
    (tmp_path / "bad.csv").write_text("dev-7-0-0,True\ndev-7-1-0,yes\n")
    assert "bad.csv:2: expected NLVR2's 'identifier,True|False'" in errors(
        ["--predictions", str(tmp_path / "bad.csv"), "--annotations", vqa], capsys)
    vqa_predictions = write_submission("vqa", PREDICTIONS["vqa"], tmp_path / "test_predict.json")
    annotations, _ = official_files(tmp_path)
    assert "--vqa-annotations is VQA's official accuracy; these are gqa predictions" in errors(
        ["--predictions", str(gqa_predictions), "--annotations", vqa, "--vqa-annotations", annotations], capsys)
    (tmp_path / "other.json").write_text(json.dumps({"annotations": [{"question_id": 5, "answers": [
        {"answer": "no"}]}]}))
    assert "other.json: 3 predicted questions not in it, e.g. question_id 11" in errors(
        ["--predictions", str(vqa_predictions), "--vqa-annotations", str(tmp_path / "other.json")], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--annotations", "a.json"], "give --model (with --features) to predict, or --predictions FILE"),
    (["--model", "m", "--predictions", "p", "--annotations", "a.json"], "give --model (with --features)"),
    (["--model", "m", "--annotations", "a.json"], "--model needs --features"),
    (["--predictions", "p", "--features", "f.tsv", "--annotations", "a"], "--features is for --model"),
    (["--predictions", "p"], "--annotations is required"),
    (["--predictions", "p", "--annotations", "a", "--vqa-questions", "q"], "--vqa-questions goes with"),
    (["--predictions", "p", "--task", "gqa", "--vqa-annotations", "v"], "not gqa's"),
])
def test_flags_that_do_not_go_together_are_refused_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
