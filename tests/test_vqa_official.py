"""The official VQA v2 accuracy (the evaluation server's vqaEval.py), quirks included, beside the soft score."""

import json

import pytest

from lxmert_fast.errors import AnnotationFormatError
from lxmert_fast.tasks.metrics import vqa_score
from lxmert_fast.tasks.vqa_official import (
    normalize_words,
    official_accuracy,
    question_accuracy,
    read_official_annotations,
    strip_punctuation,
)


def answers(*texts):
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


def test_normalisation_of_a_prediction():
    assert normalize_words(strip_punctuation("Two dogs.")) == "2 dogs"
    assert normalize_words(strip_punctuation("the T-shirt")) == "t shirt"  # a mark between letters: a space
    assert strip_punctuation("1,000") == "1000" and strip_punctuation("3.5") == "3.5"
    assert normalize_words("isnt it") == "isn't it" and normalize_words("An apple") == "apple"


def test_leave_one_out_accuracy_over_the_ten_humans():
    assert question_accuracy("yes", answers(*["yes"] * 3, *["no"] * 7)) == pytest.approx(0.9)
    assert question_accuracy("no", answers(*["yes"] * 3, *["no"] * 7)) == pytest.approx(1.0)
    assert question_accuracy("maybe", answers(*["yes"] * 3, *["no"] * 7)) == 0
    assert question_accuracy("yes", answers("yes.", *["yes"] * 4, *["no"] * 5)) == pytest.approx(1.0)


def test_identical_human_answers_are_not_normalised_the_official_quirk():
    """"two" x 10 stays "two" while the prediction becomes "2": 0, where the original's soft score gives 1."""
    assert question_accuracy("two", answers(*["two"] * 10)) == 0
    assert question_accuracy("2", answers(*["two"] * 10)) == 0
    assert vqa_score({1: "two"}, {1: {"two": 1.0}}) == 1.0
    # they differ: the humans lose punctuation only, so only the one "2" matches the prediction's "2"
    assert question_accuracy("two", answers(*["two"] * 9, "2")) == pytest.approx(0.3)


def test_official_report_and_reading_the_official_files(tmp_path):
    records = [
        {"question_id": 1, "answers": answers(*["yes"] * 10), "answer_type": "yes/no", "question_type": "is the"},
        {"question_id": 2, "answers": answers(*["2"] * 10), "answer_type": "number", "question_type": "how many"},
    ]
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": records}))
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1}, {"question_id": 2}]}))
    read = read_official_annotations(tmp_path / "ann.json", tmp_path / "q.json")
    report = official_accuracy({1: "yes", 2: "3"}, read)
    assert report["overall"] == 50.0 and report["perAnswerType"] == {"yes/no": 100.0, "number": 0.0}
    assert report["questions"] == 2

    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1}]}))
    with pytest.raises(AnnotationFormatError, match=r"q\.json: 1 annotated question not in it .*question_id 2"):
        read_official_annotations(tmp_path / "ann.json", tmp_path / "q.json")
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": [{"question_id": 1, "answers": "yes"}]}))
    with pytest.raises(AnnotationFormatError, match=r"bad\.json: annotation 0: expected question_id and a list"):
        read_official_annotations(tmp_path / "bad.json")
    (tmp_path / "ours.json").write_text(json.dumps([{"question_id": 1, "label": {"yes": 1}}]))
    with pytest.raises(AnnotationFormatError, match="expected a VQA v2 annotation file"):
        read_official_annotations(tmp_path / "ours.json")
