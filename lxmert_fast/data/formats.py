"""Readers and writers for the file formats of the original LXMERT release.

Object features, one image per TSV line (no header), tab-separated:
    img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features
img_h / img_w / num_boxes are decimal integers; the rest are base64 of little-endian buffers: ids int64 (n,),
confidences float32 (n,), boxes float32 (n, 4) as pixel x1, y1, x2, y2, features float32 (n, F) (F = 2048 in the
release; any F here, inferred from the first row when not given).

Public API
    ImageFeatures                      one decoded TSV row (dataclass of numpy arrays)
    FeatureFormatError(ValueError)     a bad TSV row; the message names file, line, img_id and the problem
    iter_feature_tsv(path, feat_dim=None, box_tolerance=1e-5) -> Iterator[(line_no, nbytes, ImageFeatures)]
    read_feature_tsv(path, feat_dim=None) -> Iterator[ImageFeatures]
    write_feature_tsv(path, records: Iterable[ImageFeatures]) -> None
    AnnotationFormatError(ValueError)  a bad pre-training JSON record (names file, record, img_id)
    read_pretrain_json(path) -> list[dict]   validated list of {img_id, sentf, labelf}
    iter_pretrain_json(path) -> Iterator[dict]   the same records, parsed one at a time as the file is read
    make_uid(img_id, source, index) -> str   "{img_id}_{source}_{index}", the original's sentence id
    normalize_answer(ans) -> str       the original's answer normalisation (fine-tuning reuses it)
    AnswerTable(path, dsets=None)      all_ans.json: answer <-> label index; .label_scores(label) maps a
                                       question's {raw answer: score} to {label: score} as the original
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lxmert_fast.errors import AnnotationFormatError, FeatureFormatError, JSONFileError
from lxmert_fast.files import atomic_path, read_json

TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)


@dataclass
class ImageFeatures:
    """One image of a feature TSV. `boxes` are in pixels, exactly as stored in the file."""

    img_id: str
    img_h: int
    img_w: int
    objects_id: np.ndarray  # (n,) int64
    objects_conf: np.ndarray  # (n,) float32
    attrs_id: np.ndarray  # (n,) int64
    attrs_conf: np.ndarray  # (n,) float32
    boxes: np.ndarray  # (n, 4) float32, x1, y1, x2, y2 in pixels
    features: np.ndarray  # (n, F) float32

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)


def _where(path, line_no: int, img_id: str | None) -> str:
    return f"{path}:{line_no}" + (f" (img_id {img_id!r})" if img_id is not None else "")


def _decode_array(text: str, dtype: str, width: int | None, n: int, column: str, where: str) -> np.ndarray:
    """Decode a base64 column into shape (n,) (width None), (n, width), or (n, inferred) (width -1)."""
    try:
        buf = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise FeatureFormatError(f"{where}: column {column!r} is not valid base64 ({err})") from None
    itemsize = np.dtype(dtype).itemsize
    if width == -1:
        if not buf or len(buf) % (n * itemsize):
            raise FeatureFormatError(
                f"{where}: column {column!r} holds {len(buf)} bytes, not a whole number of {dtype} rows for "
                f"num_boxes={n}"
            )
        width = len(buf) // (n * itemsize)
    expected = n * (width or 1) * itemsize
    if len(buf) != expected:
        shape = (n,) if width is None else (n, width)
        raise FeatureFormatError(
            f"{where}: column {column!r} holds {len(buf)} bytes, expected {expected} for shape {shape} of {dtype}"
        )
    arr = np.frombuffer(buf, dtype=dtype)
    return arr if width is None else arr.reshape(n, width)


def decode_tsv_row(
    line: str, path, line_no: int, feat_dim: int | None = None, box_tolerance: float = 1e-5
) -> ImageFeatures:
    """Parse and validate one TSV line. `feat_dim=None` infers F from the row. Raises FeatureFormatError."""
    cols = line.rstrip("\r\n").split("\t")
    img_id = cols[0] if cols and cols[0] else None
    where = _where(path, line_no, img_id)
    if len(cols) != len(TSV_FIELDS):
        raise FeatureFormatError(f"{where}: expected {len(TSV_FIELDS)} tab-separated columns, found {len(cols)}")
    if img_id is None:
        raise FeatureFormatError(f"{where}: empty img_id")
    img_h, img_w, n = _decode_sizes(cols, where)

    def col(name):
        return cols[TSV_FIELDS.index(name)]

    objects_id = _decode_array(col("objects_id"), "<i8", None, n, "objects_id", where)
    objects_conf = _decode_array(col("objects_conf"), "<f4", None, n, "objects_conf", where)
    attrs_id = _decode_array(col("attrs_id"), "<i8", None, n, "attrs_id", where)
    attrs_conf = _decode_array(col("attrs_conf"), "<f4", None, n, "attrs_conf", where)
    boxes = _decode_array(col("boxes"), "<f4", 4, n, "boxes", where)
    features = _decode_array(col("features"), "<f4", -1 if feat_dim is None else feat_dim, n, "features", where)

    _check_labels_and_features(where, objects_id, objects_conf, attrs_id, attrs_conf, features)
    _check_boxes(where, boxes, img_h, img_w, box_tolerance)
    return ImageFeatures(img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, boxes, features)


def _decode_sizes(cols: list[str], where: str) -> tuple[int, int, int]:
    """The row's (img_h, img_w, num_boxes): integers, all positive."""
    ints = {}
    for name in ("img_h", "img_w", "num_boxes"):
        text = cols[TSV_FIELDS.index(name)]
        try:
            ints[name] = int(text)
        except ValueError:
            raise FeatureFormatError(f"{where}: column {name!r} is not an integer: {text[:40]!r}") from None
    img_h, img_w, n = ints["img_h"], ints["img_w"], ints["num_boxes"]
    if img_h <= 0 or img_w <= 0:
        raise FeatureFormatError(f"{where}: image size must be positive, got img_h={img_h} img_w={img_w}")
    if n <= 0:
        raise FeatureFormatError(f"{where}: num_boxes must be positive, got {n}")
    return img_h, img_w, n


def _check_labels_and_features(
    where: str,
    objects_id: np.ndarray,
    objects_conf: np.ndarray,
    attrs_id: np.ndarray,
    attrs_conf: np.ndarray,
    features: np.ndarray,
) -> None:
    """Label ids not negative; confidences and features finite; confidences not negative."""
    for name, ids in (("objects_id", objects_id), ("attrs_id", attrs_id)):
        if (ids < 0).any():
            raise FeatureFormatError(f"{where}: negative label id in {name!r}: {ids[ids < 0][:5].tolist()}")
    for name, arr in (("objects_conf", objects_conf), ("attrs_conf", attrs_conf), ("features", features)):
        if not np.isfinite(arr).all():
            raise FeatureFormatError(f"{where}: column {name!r} holds NaN or infinite values")
    for name, conf in (("objects_conf", objects_conf), ("attrs_conf", attrs_conf)):
        if (conf < 0).any():  # the confidence weighs the object's loss: a negative one would reward errors
            i = int(np.flatnonzero(conf < 0)[0])
            raise FeatureFormatError(
                f"{where}: {int((conf < 0).sum())} negative confidence(s) in {name!r}, first: box {i} = "
                f"{float(conf[i])}"
            )


def _check_boxes(where: str, boxes: np.ndarray, img_h: int, img_w: int, box_tolerance: float) -> None:
    """Every box has x1 <= x2 and y1 <= y2 and lies inside the image (up to box_tolerance of its size)."""
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        i = int(np.flatnonzero(flipped)[0])
        raise FeatureFormatError(
            f"{where}: {int(flipped.sum())} box(es) with x2 < x1 or y2 < y1, first: box {i} = {boxes[i].tolist()} "
            "(x1, y1, x2, y2 pixels)"
        )
    scale = np.array([img_w, img_h, img_w, img_h], dtype=np.float64)
    norm = boxes / scale
    bad = ~((norm >= -box_tolerance) & (norm <= 1 + box_tolerance)).all(axis=1)  # NaN counts as bad
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FeatureFormatError(
            f"{where}: {int(bad.sum())} box(es) outside the {img_w}x{img_h} image, first: box {i} = "
            f"{boxes[i].tolist()} (x1, y1, x2, y2 pixels)"
        )


def iter_feature_tsv(
    path, feat_dim: int | None = None, box_tolerance: float = 1e-5
) -> Iterator[tuple[int, int, ImageFeatures]]:
    """Stream (line_no, bytes_read, record) over a feature TSV in constant memory.

    The first row fixes F when `feat_dim` is None; every later row must match it. Blank lines are skipped.
    Duplicate img_ids are the caller's business (the store converter rejects them).
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("ascii")
            except UnicodeDecodeError:
                raise FeatureFormatError(f"{_where(path, line_no, None)}: line is not ASCII text") from None
            record = decode_tsv_row(line, path, line_no, feat_dim, box_tolerance)
            feat_dim = record.features.shape[1]
            yield line_no, len(raw), record


def read_feature_tsv(path, feat_dim: int | None = None) -> Iterator[ImageFeatures]:
    """Stream the records of a feature TSV (see iter_feature_tsv)."""
    for _line_no, _nbytes, record in iter_feature_tsv(path, feat_dim):
        yield record


def _b64(arr: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode("ascii")


def encode_tsv_row(r: ImageFeatures) -> str:
    """One TSV line (with the trailing newline) in the released format."""
    n = r.num_boxes
    if not (len(r.objects_id) == len(r.objects_conf) == len(r.attrs_id) == len(r.attrs_conf) == len(r.features) == n):
        raise ValueError(f"img_id {r.img_id!r}: per-box arrays disagree on the number of boxes")
    if "\t" in r.img_id or "\n" in r.img_id:
        raise ValueError(f"img_id {r.img_id!r} contains a tab or newline")
    cols = [
        r.img_id,
        str(int(r.img_h)),
        str(int(r.img_w)),
        _b64(r.objects_id, "<i8"),
        _b64(r.objects_conf, "<f4"),
        _b64(r.attrs_id, "<i8"),
        _b64(r.attrs_conf, "<f4"),
        str(n),
        _b64(r.boxes, "<f4"),
        _b64(r.features, "<f4"),
    ]
    return "\t".join(cols) + "\n"


def write_feature_tsv(path, records: Iterable[ImageFeatures]) -> None:
    """Write records as a released-format feature TSV (streaming; written atomically)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii", newline="\n") as f:
        for record in records:
            f.write(encode_tsv_row(record))


# ---------------------------------------------------------------------------------------------------------------
# Pre-training annotations


def make_uid(img_id: str, source: str, index: int) -> str:
    """The original's sentence id."""
    return f"{img_id}_{source}_{index}"


_PRETRAIN_JSON = "a pre-training annotation file: a JSON list of {img_id, sentf, labelf} objects"


def read_pretrain_json(path) -> list[dict]:
    """Load and validate a pre-training annotation file: a list of {img_id, sentf{src: [sent]}, labelf{src: [{ans:
    score}]}}. `labelf` may be missing (captions only); `labelf[src]` must parallel `sentf[src]`. Empty sentences
    and negative or non-finite scores are rejected with an AnnotationFormatError naming file, record and img_id."""
    return list(iter_pretrain_json(path))


def iter_pretrain_json(path) -> Iterator[dict]:
    """The records of read_pretrain_json one at a time, parsed as the file is read: the release's 9M sentences never
    sit in memory as Python objects. The same records and the same errors."""
    for k, datum in enumerate(_json_list_items(path)):
        _check_record(path, k, datum)
        yield datum


class _NotAList(Exception):
    """The streaming reader met something it does not parse itself (read_json then reads the file, for the error)."""


def _json_list_items(path, chunk_chars: int = 1 << 22) -> Iterator:
    """The items of the JSON list in `path`, decoded one at a time from chunks of the file. Anything else (not a list,
    invalid JSON, not UTF-8) is read again the ordinary way, whose error names file, line and column as before."""
    count = 0
    try:
        with open(path, encoding="utf-8") as f:
            stream = _TextStream(f, chunk_chars)
            if stream.next_char() != "[":
                raise _NotAList
            stream.pos += 1
            separator = stream.next_char()
            if separator == "]":  # an empty list
                stream.pos += 1
            while separator != "]":
                item = stream.value()
                count += 1
                yield item
                separator = stream.next_char()
                if separator not in (",", "]"):
                    raise _NotAList
                stream.pos += 1
            if stream.next_char() != "":
                raise _NotAList
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, _NotAList):
        try:
            data = read_json(path, _PRETRAIN_JSON)
        except JSONFileError as err:
            raise AnnotationFormatError(str(err)) from None
        if not isinstance(data, list):
            kind = type(data).__name__
            raise AnnotationFormatError(f"{path}: expected a JSON list of image records, got {kind}") from None
        yield from data[count:]


class _TextStream:
    """A text file read in chunks, with a read position in the current chunk."""

    _NOT_SPACE = re.compile(r"[^ \t\n\r]")
    _DECODER = json.JSONDecoder()

    def __init__(self, f, chunk_chars: int):
        self.f, self.chunk_chars, self.buf, self.pos = f, chunk_chars, "", 0

    def _more(self) -> bool:
        data = self.f.read(self.chunk_chars)
        if data:
            self.buf, self.pos = self.buf[self.pos :] + data, 0
        return bool(data)

    def next_char(self) -> str:
        """The next character that is not JSON white space, not consumed; "" at the end of the file."""
        while (found := self._NOT_SPACE.search(self.buf, self.pos)) is None:
            self.pos = len(self.buf)
            if not self._more():
                return ""
        self.pos = found.start()
        return self.buf[self.pos]

    def value(self):
        """The JSON value at the read position, consumed (more of the file is read while it is cut off)."""
        while True:
            try:
                value, end = self._DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if not self._more():
                    raise
                continue
            if end < len(self.buf) or not self._more():  # a number at the chunk's end may go on in the next
                self.pos = end
                return value


def _check_record(path, k: int, datum) -> None:
    img_id = datum.get("img_id") if isinstance(datum, dict) else None
    where = f"{path}: record {k} (img_id {img_id!r})"
    if not isinstance(img_id, str) or not img_id:
        raise AnnotationFormatError(f"{where}: missing or non-string 'img_id'")
    sentf = datum.get("sentf")
    if not isinstance(sentf, dict):
        raise AnnotationFormatError(f"{where}: 'sentf' must be an object {{source: [sentences]}}")
    labelf = datum.get("labelf", {})
    if not isinstance(labelf, dict):
        raise AnnotationFormatError(f"{where}: 'labelf' must be an object {{source: [{{answer: score}}]}}")
    for src, sents in sentf.items():
        if not isinstance(sents, list):
            raise AnnotationFormatError(f"{where}: sentf[{src!r}] must be a list of sentences")
        for i, sent in enumerate(sents):
            if not isinstance(sent, str) or not sent.strip():
                raise AnnotationFormatError(f"{where}: sentf[{src!r}][{i}] is empty or not a string: {sent!r}")
    for src, labels in labelf.items():
        _check_labels(where, src, labels, sentf)


def _check_labels(where: str, src: str, labels, sentf: dict) -> None:
    if src not in sentf:
        raise AnnotationFormatError(f"{where}: labelf[{src!r}] has no matching sentf[{src!r}]")
    if not isinstance(labels, list) or len(labels) != len(sentf[src]):
        raise AnnotationFormatError(
            f"{where}: labelf[{src!r}] must be a list parallel to sentf[{src!r}] ({len(sentf[src])} sentences)"
        )
    for i, label in enumerate(labels):
        if not isinstance(label, dict):
            raise AnnotationFormatError(f"{where}: labelf[{src!r}][{i}] must be an object {{answer: score}}")
        for ans, score in label.items():
            ok = isinstance(score, int | float) and not isinstance(score, bool)
            if not ok or not math.isfinite(score) or score < 0:
                raise AnnotationFormatError(f"{where}: labelf[{src!r}][{i}] answer {ans!r} has invalid score {score!r}")


# ---------------------------------------------------------------------------------------------------------------
# Answers

# The original's whole-answer rewrites (`AnswerTable.ANS_CONVERT` in src/pretrain/qa_answer_table.py).
_ANSWER_REWRITES = {
    "a man": "man",
    "the man": "man",
    "a woman": "woman",
    "the woman": "woman",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}


def normalize_answer(ans: str) -> str:
    """The original's answer normalisation (`AnswerTable.convert_ans`), exactly: lower-case; drop one trailing '.';
    drop a leading "a ", then a leading "an ", then a leading "the " (each once, in this order, stripping spaces
    after each drop); then rewrite a whole-answer number word to digits and "grey" to "gray". "Two" -> "2",
    "the Grey." -> "gray", "two dogs" and "zero" unchanged (the released answer table holds both "zero" and "0"),
    " two" unchanged (no other whitespace is stripped)."""
    if not ans:
        return ""
    ans = ans.lower()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    for article in ("a ", "an ", "the "):
        if ans.startswith(article):
            ans = ans[len(article) :].strip()
    return _ANSWER_REWRITES.get(ans, ans)


class AnswerTable:
    """The joint QA answer table (`all_ans.json`: a list of {"ans": str, "dsets": [str]}).

    `dsets` keeps only answers used by one of those data sets (the original's `qa_sets`); the label of an answer
    is its position among the kept ones. Entries are used as written (the released ones are already normalised);
    lookups normalise their argument.
    """

    def __init__(self, path, dsets: Iterable[str] | None = None):
        self.path = Path(path)
        entries = read_json(self.path, "the answer table all_ans.json: a JSON list of {ans, dsets} objects")
        if not isinstance(entries, list):
            raise ValueError(f"{self.path}: expected a JSON list of {{'ans', 'dsets'}} entries")
        wanted = None if dsets is None else set(dsets)
        self.answers: list[str] = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("ans"), str):
                raise ValueError(f"{self.path}: entry {k} is not an object with a string 'ans': {entry!r}")
            if wanted is None or wanted & set(entry.get("dsets", ())):
                self.answers.append(entry["ans"])
        self._ids = {ans: i for i, ans in enumerate(self.answers)}
        if len(self._ids) != len(self.answers):
            dup = next(a for i, a in enumerate(self.answers) if self._ids[a] != i)
            raise ValueError(f"{self.path}: answer {dup!r} appears more than once")

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, ans: str) -> bool:
        return normalize_answer(ans) in self._ids

    def ans2id(self, ans: str) -> int | None:
        """Label of `ans` after normalisation, or None when the table does not hold it."""
        return self._ids.get(normalize_answer(ans))

    def label_scores(self, label: dict[str, float]) -> dict[int, float]:
        """A question's {raw answer: score} -> {table label: score}, as the original's pre-training data does it:
        each raw answer in turn is normalised and, when the table holds the result under another spelling, moved
        there, replacing any score already under that name; answers the table lacks are dropped."""
        label = dict(label)
        for ans in list(label):
            new = normalize_answer(ans)
            if new not in self._ids:
                label.pop(ans)
            elif new != ans:
                label[new] = label.pop(ans)
        return {self._ids[ans]: float(score) for ans, score in label.items()}

    def id2ans(self, label: int) -> str:
        return self.answers[label]
