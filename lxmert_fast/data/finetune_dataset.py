"""Fine-tuning data: the released VQA v2 / GQA / NLVR2 annotation formats, answer vocabularies, and datasets.

Annotation files (JSON lists), as the original's `src/tasks/*_data.py` read them:
    VQA v2  {"question_id", "img_id", "sent", "label": {answer: soft score}, "answer_type", "question_type"}
    GQA     {"question_id", "img_id", "sent", "label": {answer: 1.0}}
    NLVR2   {"identifier", "img0", "img1", "sent", "label": 0 | 1}
`label` may be absent in test splits (`require_labels=False`). Extra keys are kept and ignored.
Answer vocabularies: `trainval_ans2label.json` ({answer: label}) with `trainval_label2ans.json` ([answer]).

Bad input raises AnnotationFormatError naming the file and the record (index and id): malformed records,
duplicate ids, and (strict=True, the default) images missing from every feature store; with strict=False such
records are left out with a warning naming the file, their count and the first img_ids. Answers that the vocabulary
does not hold are dropped from the soft label, as the original's GQA loader does; they are counted
(`num_unknown_answers`) and reported.

Sentences are tokenised once at load time as the original: [CLS] word pieces [SEP], truncated to max_seq_length
(20), padded with [PAD]; token types all 0.

Public API
    read_annotations(path, task, require_labels=True) -> list[dict]   validated records
    AnswerVocab(label2ans)                  .ans2label, .label2ans, len(), .load(ans2label, label2ans=None), .save
    QADataset(paths, stores, vocab, tokenizer, task="vqa", max_seq_length=20, require_labels=True,
              feature_dtype=np.float32, strict=True)
        items: text inputs, visual_feats (V, F), visual_pos (V, 4), visual_attention_mask (V,),
        target (num_answers,) soft scores, index; .qid(i), .labels (qid -> {answer: score}) for the metrics
    NLVR2Dataset(paths, stores, tokenizer, max_seq_length=20, require_labels=True, feature_dtype=np.float32,
                 strict=True)
        items: text inputs, visual_* with a leading pair axis of 2, label, index; .qid(i) is the identifier
    both: .text_length_stats() -> (mean, std) of the text lengths in tokens
          .with_images_shuffled(seed=0) -> a copy whose records see other images of the set (None with one image)
    finetune_collate(items) -> dict of tensors (the model's keyword arguments plus target / label, index)
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lxmert_fast.errors import JSONFileError
from lxmert_fast.files import read_json
from lxmert_fast.model.static_shapes import IGNORE_INDEX
from lxmert_fast.tasks.registry import get_task

from .feature_store import FeatureStore, index_images
from .formats import AnnotationFormatError
from .pretrain_dataset import as_feature_store, missing_images_message
from .tokenizer import check_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Annotation files


def _is_score(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def read_annotations(path, task: str, require_labels: bool = True) -> list[dict]:
    """Load and validate one VQA / GQA / NLVR2 annotation file (see the module docstring)."""
    spec = get_task(task)
    path = Path(path)
    fields = ", ".join((spec.id_field, *spec.image_fields, "sent", "label"))
    try:
        data = read_json(path, f"a {task} annotation file: a JSON list of {{{fields}}} objects")
    except JSONFileError as err:
        raise AnnotationFormatError(str(err)) from None
    if not isinstance(data, list):
        raise AnnotationFormatError(f"{path}: expected a JSON list of {task} records, got {type(data).__name__}")
    id_key = spec.id_field
    seen: dict = {}
    for k, datum in enumerate(data):
        rid = datum.get(id_key) if isinstance(datum, dict) else None
        where = f"{path}: record {k} ({id_key} {rid!r})"
        if not isinstance(datum, dict):
            raise AnnotationFormatError(f"{where}: expected an object, got {type(datum).__name__}")
        if not isinstance(rid, str | int) or isinstance(rid, bool) or rid == "":
            raise AnnotationFormatError(f"{where}: missing or invalid {id_key!r}")
        if rid in seen:
            raise AnnotationFormatError(f"{where}: duplicate {id_key}, already record {seen[rid]}")
        seen[rid] = k
        sent = datum.get("sent")
        if not isinstance(sent, str) or not sent.strip():
            raise AnnotationFormatError(f"{where}: 'sent' is missing, empty or not a string: {sent!r}")
        for key in spec.image_fields:
            if not isinstance(datum.get(key), str) or not datum[key]:
                raise AnnotationFormatError(f"{where}: missing or non-string {key!r}")
        if "label" not in datum:
            if require_labels:
                raise AnnotationFormatError(f"{where}: no 'label' (only test splits may omit it)")
            continue
        label = datum["label"]
        if not spec.answers:  # NLVR2
            if label not in (0, 1) or isinstance(label, bool | float):
                raise AnnotationFormatError(f"{where}: 'label' must be 0 or 1, got {label!r}")
        else:
            if not isinstance(label, dict):
                raise AnnotationFormatError(f"{where}: 'label' must be an object {{answer: score}}, got {label!r}")
            for ans, score in label.items():
                if not _is_score(score):
                    raise AnnotationFormatError(f"{where}: answer {ans!r} has invalid score {score!r}")
    return data


def _split_paths(paths) -> list[Path]:
    if isinstance(paths, str | Path):
        paths = [paths]
    return [Path(p) for p in paths]


# ---------------------------------------------------------------------------------------------------------------
# Answer vocabulary


class AnswerVocab:
    """A task's answer classes: label k is `label2ans[k]`; lookups are exact, as the original's (the released
    files are already normalised)."""

    def __init__(self, label2ans: Sequence[str]):
        self.label2ans = [str(a) for a in label2ans]
        self.ans2label = {a: i for i, a in enumerate(self.label2ans)}
        if len(self.ans2label) != len(self.label2ans):
            dup = next(a for i, a in enumerate(self.label2ans) if self.ans2label[a] != i)
            raise ValueError(f"answer {dup!r} appears more than once in the answer vocabulary")

    def __len__(self) -> int:
        return len(self.label2ans)

    @classmethod
    def load(cls, ans2label_path, label2ans_path=None) -> AnswerVocab:
        """Read `*_ans2label.json` (and check it against `*_label2ans.json`, by default its sibling)."""
        ans2label_path = Path(ans2label_path)
        ans2label = read_json(ans2label_path, "an answer vocabulary (trainval_ans2label.json): a JSON object "
                              "{answer: integer label}")
        if not isinstance(ans2label, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in ans2label.values()
        ):
            raise ValueError(f"{ans2label_path}: expected an object {{answer: integer label}}")
        labels = sorted(ans2label.values())
        if labels != list(range(len(labels))):
            raise ValueError(f"{ans2label_path}: labels must be 0..{len(labels) - 1}, each once")
        label2ans = [""] * len(ans2label)
        for ans, i in ans2label.items():
            label2ans[i] = ans
        if label2ans_path is None:
            sibling = ans2label_path.with_name(ans2label_path.name.replace("ans2label", "label2ans"))
            label2ans_path = sibling if sibling != ans2label_path and sibling.is_file() else None
        if label2ans_path is not None:
            other = read_json(label2ans_path, "an answer list (trainval_label2ans.json): a JSON list of answers, the "
                              "answer of label k at position k")
            if other != label2ans:
                raise ValueError(f"{label2ans_path} does not agree with {ans2label_path}")
        return cls(label2ans)

    def save(self, ans2label_path, label2ans_path) -> None:
        with open(ans2label_path, "w", encoding="utf-8") as f:
            json.dump(self.ans2label, f)
        with open(label2ans_path, "w", encoding="utf-8") as f:
            json.dump(self.label2ans, f)


# ---------------------------------------------------------------------------------------------------------------
# Datasets


class _FinetuneDataset(torch.utils.data.Dataset):
    """Shared by the task datasets: image lookup over several stores and sentence tokenisation."""

    def __init__(self, stores, tokenizer, max_seq_length: int, feature_dtype=np.float32, strict: bool = True):
        # feature_dtype float16, the stores' own, gives the same values in half the bytes to copy between loader
        # processes and to the device, which then casts (finetune.py does this); float32 suits the model as is
        self.feature_dtype = np.dtype(feature_dtype)
        if self.feature_dtype not in (np.float16, np.float32):
            raise ValueError(f"feature_dtype must be float16 or float32, got {self.feature_dtype}")
        if isinstance(stores, str | Path | FeatureStore):
            stores = [stores]
        self.stores = [as_feature_store(s) for s in stores]
        if not self.stores:
            raise ValueError("no feature stores given")
        dims = {(s.feat_dim, s.max_boxes) for s in self.stores}
        if len(dims) != 1:
            raise ValueError(f"feature stores disagree on (feat_dim, max_boxes): {sorted(dims)}")
        self.feat_dim, self.max_boxes = dims.pop()
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_seq_length = max_seq_length
        self.strict = strict
        self._where = index_images(self.stores)  # img_id -> (store, row)
        self._missing: dict[str, list[str]] = {}  # annotation file -> img_ids of the records left out

    def _locate(self, img_ids: list[str], path, where: str) -> list[tuple[int, int]] | None:
        """The (store, row) of each image of a record; None (the record is left out, and noted) when one is in no
        store and not strict."""
        absent = [img_id for img_id in img_ids if img_id not in self._where]
        if not absent:
            return [self._where[img_id] for img_id in img_ids]
        if self.strict:
            files = ", ".join(s.source_name for s in self.stores)
            raise AnnotationFormatError(
                f"{where}: image {absent[0]!r} is in none of the feature files ({files}); pass its feature TSV "
                "with --features"
            )
        self._missing.setdefault(str(path), []).extend(absent)
        return None

    def _check_loaded(self, paths, what: str) -> None:
        """After the records are read: report the records left out, then check the tokenizer on the sentences."""
        message = missing_images_message(self._missing, self.stores) if self._missing else ""
        if not self.records:
            raise ValueError(f"no {what} in {', '.join(str(p) for p in paths)}" + (f": {message}" if message else ""))
        if message:
            logger.warning("left out %s (--strict makes this an error)", message)
        check_tokenizer(self.tokenizer, [d["sent"] for d in self.records[:64]])

    def _tokenize(self, sents: list[str]) -> np.ndarray:
        """(N, L) word-piece ids: [CLS] pieces [SEP] [PAD]..., cut to max_seq_length as the original."""
        enc = self.tokenizer(
            [s.strip() for s in sents],
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_seq_length,
            padding="max_length",
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(sents), self.max_seq_length)

    def _text(self, index: int) -> dict[str, np.ndarray]:
        ids = self._input_ids[index]
        return {
            "input_ids": ids,
            "attention_mask": (ids != self.tokenizer.pad_token_id).astype(np.int64),
            "token_type_ids": np.zeros_like(ids),
        }

    def text_length_stats(self) -> tuple[float, float]:
        """Mean and standard deviation of the text length in tokens ([CLS] and [SEP] included) over the data set:
        what StaticShapes.from_statistics needs."""
        lengths = (self._input_ids != self.tokenizer.pad_token_id).sum(axis=1).astype(np.float64)
        return float(lengths.mean()), float(lengths.std())

    def _visual(self, image: tuple[int, int]) -> dict[str, np.ndarray]:
        store, row = self.stores[image[0]], image[1]
        nb = int(store.num_boxes[row])
        return {
            "visual_feats": store.features[row].astype(self.feature_dtype),  # (V, F), a copy out of the fp16 store
            "visual_pos": np.array(store.boxes[row], dtype=np.float32),  # (V, 4) in [0, 1]
            "visual_attention_mask": (np.arange(self.max_boxes) < nb).astype(np.int64),
        }

    def __len__(self) -> int:
        return len(self._input_ids)

    def with_images_shuffled(self, seed: int = 0):
        """A copy in which every image of the set is replaced by another one of the set (one fixed random cycle
        through all of them, so no record keeps its own image); the questions and labels stay. A model that scores
        as well on it as on the real images does not use the images. None when the set holds a single image."""
        pairs = bool(self._images) and isinstance(self._images[0][0], tuple)  # NLVR2: ((store, row), (store, row))
        images = sorted({image for entry in self._images for image in (entry if pairs else (entry,))})
        if len(images) < 2:
            return None
        cycle = [images[k] for k in np.random.default_rng(seed).permutation(len(images))]
        other = {image: cycle[(k + 1) % len(cycle)] for k, image in enumerate(cycle)}
        shuffled = copy.copy(self)
        shuffled._images = [tuple(other[i] for i in entry) if pairs else other[entry] for entry in self._images]
        return shuffled


class QADataset(_FinetuneDataset):
    """VQA / GQA questions with soft-score targets over an AnswerVocab (see the module docstring)."""

    def __init__(
        self,
        paths,
        stores,
        vocab: AnswerVocab,
        tokenizer,
        task: str = "vqa",
        max_seq_length: int = 20,
        require_labels: bool = True,
        feature_dtype=np.float32,
        strict: bool = True,
    ):
        super().__init__(stores, tokenizer, max_seq_length, feature_dtype, strict)
        if not get_task(task).answers:
            raise ValueError(f"QADataset is for vqa or gqa, not {task!r}")
        self.task, self.vocab = task, vocab
        self.records: list[dict] = []
        self._images: list[tuple[int, int]] = []
        self.num_unknown_answers = 0
        unknown_examples: list[str] = []
        for path in _split_paths(paths):
            for k, datum in enumerate(read_annotations(path, task, require_labels)):
                where = f"{path}: record {k} (question_id {datum['question_id']!r})"
                images = self._locate([datum["img_id"]], path, where)
                if images is None:
                    continue
                self._images.append(images[0])
                self.records.append(datum)
                for ans in datum.get("label", {}):
                    if ans not in vocab.ans2label:
                        self.num_unknown_answers += 1
                        if len(unknown_examples) < 5:
                            unknown_examples.append(f"{ans!r} ({where})")
        self._check_loaded(_split_paths(paths), "questions")
        if self.num_unknown_answers:
            logger.warning(
                "%d answers of %d questions are not in the answer vocabulary (%d answers) and were dropped from the "
                "soft labels, e.g. %s",
                self.num_unknown_answers,
                len(self.records),
                len(vocab),
                "; ".join(unknown_examples),
            )
        self._input_ids = self._tokenize([d["sent"] for d in self.records])
        # Soft targets as (label, score) lists: dense (num_answers,) vectors are built per item.
        self._targets = [
            [(vocab.ans2label[a], float(s)) for a, s in d.get("label", {}).items() if a in vocab.ans2label]
            for d in self.records
        ]

    def qid(self, index: int):
        return self.records[index]["question_id"]

    @property
    def labels(self) -> dict:
        """question_id -> {answer: score}, for the metrics (questions without a label are left out)."""
        return {d["question_id"]: d["label"] for d in self.records if "label" in d}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        out = self._text(index)
        out.update(self._visual(self._images[index]))
        target = np.zeros(len(self.vocab), dtype=np.float32)
        for label, score in self._targets[index]:
            target[label] = score
        out["target"] = target
        out["index"] = np.int64(index)
        return out


class NLVR2Dataset(_FinetuneDataset):
    """NLVR2 statements about an image pair (img0 = left, img1 = right), label 1 = true."""

    def __init__(self, paths, stores, tokenizer, max_seq_length: int = 20, require_labels: bool = True,
                 feature_dtype=np.float32, strict: bool = True):
        super().__init__(stores, tokenizer, max_seq_length, feature_dtype, strict)
        self.records: list[dict] = []
        self._images: list[tuple[tuple[int, int], tuple[int, int]]] = []
        for path in _split_paths(paths):
            for k, datum in enumerate(read_annotations(path, "nlvr2", require_labels)):
                where = f"{path}: record {k} (identifier {datum['identifier']!r})"
                images = self._locate([datum["img0"], datum["img1"]], path, where)
                if images is None:
                    continue
                self._images.append(tuple(images))
                self.records.append(datum)
        self._check_loaded(_split_paths(paths), "statements")
        self._input_ids = self._tokenize([d["sent"] for d in self.records])

    def qid(self, index: int) -> str:
        return self.records[index]["identifier"]

    @property
    def labels(self) -> dict:
        """identifier -> 0 | 1, for the metrics."""
        return {d["identifier"]: d["label"] for d in self.records if "label" in d}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        out = self._text(index)
        pair = [self._visual(image) for image in self._images[index]]
        for key in pair[0]:
            out[key] = np.stack([pair[0][key], pair[1][key]])  # (2, V, ...): left image first
        out["label"] = np.int64(self.records[index].get("label", IGNORE_INDEX))
        out["index"] = np.int64(index)
        return out


def finetune_collate(items: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack dataset items: input_ids / attention_mask / token_type_ids (B, L); visual_feats (B, V, F) or (B, 2, V,
    F) for NLVR2, visual_pos (B, [2,] V, 4), visual_attention_mask (B, [2,] V); target (B, num_answers) float32 or
    label (B,) long; index (B,)."""
    return {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in items[0]}


__all__ = [
    "AnswerVocab",
    "NLVR2Dataset",
    "QADataset",
    "finetune_collate",
    "read_annotations",
]
