"""The official VQA v2 accuracy (the VQA evaluation server's, GT-Vision-Lab/VQA ``vqaEval.py``), beside the original
LXMERT's soft score (tasks/scoring.py ``vqa_score``: a lookup of the predicted answer in the question's label dict).

The paper's numbers (72.42 test-dev, 72.54 test-std) come from the evaluation server, i.e. this accuracy; the
original code's own validation number is the soft score. They differ where the official normalisation applies:
a prediction is always normalised (punctuation, number words to digits, articles dropped, contractions), the ten
human answers only when they are not all the same string ("two" x 10 stays "two", so the prediction "two",
normalised to "2", scores 0), and per question the accuracy is the mean over the ten leave-one-out subsets of
min(1, matching humans / 3). Reproduced here faithfully, quirks included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from lxmert_fast.cli import plural
from lxmert_fast.errors import AnnotationFormatError
from lxmert_fast.files import read_json

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (sic: the official pattern, a lookahead where a lookbehind was meant)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official table: a word typed without its apostrophe -> the word with it (the evaluation server's own entries,
# the odd ones included, e.g. "somebody'd" -> "somebodyd").
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've""".split())


def strip_punctuation(text: str) -> str:
    """The official processPunctuation: a mark next to a space (or any text with a digit,digit comma) is
    dropped, otherwise replaced by a space; then periods not next to a digit are dropped."""
    out = text
    for mark in _PUNCTUATION:  # decided on the text as given, applied to the text so far, as officially
        drop = (mark + " " in text or " " + mark in text) or _DIGIT_COMMA_DIGIT.search(text) is not None
        out = out.replace(mark, "" if drop else " ")
    return _PERIOD.sub("", out, count=32)  # the official passes re.UNICODE (32) where the count goes


def normalize_words(text: str) -> str:
    """The official processDigitArticle: lower case, number words to digits, articles dropped, contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def question_accuracy(prediction: str, answers: list[dict]) -> float:
    """One question's official accuracy: ``answers`` are its ten human answer records ({"answer", "answer_id",
    ...}); the mean over each record left out of min(1, matching others / 3)."""
    predicted = normalize_words(strip_punctuation(prediction.replace("\n", " ").replace("\t", " ").strip()))
    answers = [dict(a) for a in answers]
    if len({a["answer"] for a in answers}) > 1:  # only where the humans disagree (the official quirk)
        for a in answers:
            a["answer"] = strip_punctuation(a["answer"])
    scores = []
    for left_out in answers:
        matching = sum(1 for a in answers if a != left_out and a["answer"] == predicted)
        scores.append(min(1.0, matching / 3))
    return sum(scores) / len(scores)


def official_accuracy(predictions: Mapping, annotations: Iterable[dict]) -> dict:
    """The evaluation server's report for ``predictions`` {question_id: answer} against the official annotation
    records: overall, per answer type and per question type, in percent rounded to 2 places."""
    overall, per_answer_type, per_question_type = [], {}, {}
    for record in annotations:
        accuracy = question_accuracy(str(predictions[record["question_id"]]), record["answers"])
        overall.append(accuracy)
        per_answer_type.setdefault(record.get("answer_type"), []).append(accuracy)
        per_question_type.setdefault(record.get("question_type"), []).append(accuracy)

    def percent(values):
        return round(100 * sum(values) / len(values), 2)

    return {"overall": percent(overall), "perAnswerType": {k: percent(v) for k, v in per_answer_type.items()},
            "perQuestionType": {k: percent(v) for k, v in per_question_type.items()}, "questions": len(overall)}


def read_official_annotations(annotation_file, question_file=None) -> list[dict]:
    """The records of an official VQA v2 annotation file ({"annotations": [...]}, ten answers each), checked; with
    the question file ({"questions": [...]}), every annotated question must be in it."""
    data = read_json(annotation_file, "a VQA v2 annotation file ({\"annotations\": [...]})")
    records = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise AnnotationFormatError(f"{annotation_file}: expected a VQA v2 annotation file, a JSON object with a list "
                                    "\"annotations\"")
    for index, record in enumerate(records):
        answers = record.get("answers") if isinstance(record, dict) else None
        if "question_id" not in (record if isinstance(record, dict) else {}) or not isinstance(answers, list) or \
                not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise AnnotationFormatError(f"{annotation_file}: annotation {index}: expected question_id and a list of "
                                        "answers ({\"answer\": ...})")
    if question_file is not None:
        questions = read_json(question_file, "a VQA v2 question file ({\"questions\": [...]})")
        known = {q.get("question_id") for q in questions.get("questions", [])} if isinstance(questions, dict) else set()
        missing = [r["question_id"] for r in records if r["question_id"] not in known]
        if missing:
            raise AnnotationFormatError(f"{question_file}: {plural(len(missing), 'annotated question')} not in it "
                                        f"(e.g. question_id {missing[0]}): the two files are not of one split")
    return records
