"""LXMERT pre-training examples: one (sentence, image) pair per item, with the five tasks' inputs and labels.

Faithful to the original `src/pretrain/lxmert_pretrain.py`:
- masked LM: 15% of the sentence's word pieces ([CLS]/[SEP] never); of those 80% -> [MASK], 10% -> a random
  id of the whole vocabulary, 10% kept; labels are the original ids there and -100 elsewhere. Applied to
  mismatched pairs too.
- matching: with probability 0.5 the sentence is swapped for one of another image (matched_label 0).
- masked objects: 15% of the real objects; of those 80% zeroed, 10% replaced by the feature of a random object of
  a random sentence's image (the original does not exclude the same image; neither do we), 10% kept; the `feat`
  target is the unmasked feature with mask 1 on masked objects. Object / attribute labels and confidences are
  given for all objects (the loss is over all 36, weighted by confidence, as in the original).
- QA: for a matched question sentence whose soft answers (mapped through the answer table at load time, unknown
  answers dropped) are not empty, an answer sampled with probability proportional to its score; otherwise -100.
  Enabled from epoch `qa_from_epoch` on (0: every epoch, as the released code; 10 of 20 in the paper).
- sentences longer than max_seq_length - 2 word pieces are truncated, as in the original.
Differences, on purpose: ignore index -100 (HF) instead of -1; images with fewer than 36 boxes are zero-padded and
masked out through `visual_attention_mask` (the released files always have 36).

Every random choice of an item is drawn from one generator seeded by (seed, epoch, index), so an item does not
depend on the rank, worker, or order in which it is requested. `set_epoch(e)` must be called before each epoch's
DataLoader iterator is created (workers copy the dataset when they start: with persistent_workers=True the epoch
would stay frozen; index the dataset with (epoch, index) pairs in that case).

The sentences, image references and answer labels are packed into numpy arrays at load time, so workers do not
touch Python object refcounts (which would un-share copy-on-write pages) when they read them.

Public API
    PretrainDataset(annotation_paths, feature_stores, answer_table, tokenizer, *, max_seq_length=20, seed=9595,
                    word_mask_rate=0.15, obj_mask_rate=0.15, task_matched=True, qa_from_epoch=0, sources=None,
                    feature_dtype=np.float32, strict=False)
        .set_epoch(epoch), .epoch, .qa_enabled, len(ds), ds[index] or ds[(epoch, index)] -> dict of numpy arrays,
        .uid(index) -> "{img_id}_{source}_{index}", .num_dropped (sentences without features, left out unless
        strict),
        .text_length_stats() -> (mean, std) of the text lengths in tokens,
        .slot_bytes(batch) -> the bytes a batch_ring slot needs for a compact batch of that size,
        .__getitems__(indices) -> PretrainBatch: a whole batch at once (a DataLoader calls it), the same values,
        built compact (pretrain_batch.py)
    pretrain_collate(items) -> dict of tensors: exactly the keyword arguments of LxmertForPreTraining.forward
    compact_pretrain_collate(items) -> CompactBatch: the batch as it should travel to the device, where
        pretrain_batch.pretrain_inputs expands it into the same keyword arguments
    missing_images_message(missing, stores) -> str   names the records whose image no store holds (per file)
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lxmert_fast.cli import plural
from lxmert_fast.model.static_shapes import IGNORE_INDEX

from .feature_store import FeatureStore, index_images
from .formats import AnnotationFormatError, AnswerTable, iter_pretrain_json, make_uid
from .item_rng import item_generators
from .pretrain_batch import (
    KEPT,
    REPLACED,
    UNMASKED,
    ZEROED,
    CompactBatch,
    buffer_size,
    compact_fields,
    dense_arrays,
    forward_kwargs,
)
from .tokenizer import check_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)



def as_feature_store(store) -> FeatureStore:
    """A FeatureStore from a store, a store folder or a TSV (converted once)."""
    if isinstance(store, FeatureStore):
        return store
    path = Path(store)
    return FeatureStore(path) if path.is_dir() else FeatureStore.from_tsv(path)


def missing_images_message(missing: dict, stores) -> str:
    """Names the annotation records whose image no feature store holds: per annotation file their number and the
    first img_ids. `missing`: {annotation file: [img_id of each such record]}."""
    parts = []
    for path, img_ids in missing.items():
        distinct = list(dict.fromkeys(img_ids))
        shown = ", ".join(repr(i) for i in distinct[:5]) + (", ..." if len(distinct) > 5 else "")
        parts.append(f"{path}: {plural(len(img_ids), 'record')} (img_id {shown})")
    files = ", ".join(s.source_name for s in stores)
    return f"annotation records whose image is in none of the feature files ({files}): {'; '.join(parts)}"


class _SentenceColumns:
    """The sentences read so far as flat typed columns (8 bytes or less a value, not a Python object each), viewed
    as numpy arrays once all files are read."""

    def __init__(self):
        self.text = bytearray()  # the UTF-8 sentences back to back; sentence k ends at text_end[k]
        self.text_end = array("q")
        self.img = array("q")  # index into the global image index
        self.src = array("h")  # source id
        self.idx = array("i")  # position of the sentence within its record's source
        self.is_question = array("b")
        self.ans = array("q")  # answer labels of all questions back to back; sentence k's end at lab_end[k]
        self.score = array("d")
        self.lab_end = array("q")


class PretrainDataset(torch.utils.data.Dataset):
    """Items of LXMERT pre-training (see the module docstring).

    annotation_paths: pre-training JSON files (a path or a list of paths).
    feature_stores:   FeatureStore objects, store directories, or feature TSVs (converted on first use).
    answer_table:     AnswerTable or a path to all_ans.json.
    tokenizer:        a transformers fast BERT tokenizer, or a local folder / hub name for BertTokenizerFast;
                      checked against the first sentences (tokenizer.check_tokenizer).
    sources:          keep only these sentence sources (e.g. {"mscoco", "vg", "vqa", "gqa", "visual7w"}).
    feature_dtype:    dtype of visual_feats and the feat target. float32 (default) suits the model as is;
                      float16, the stores' own dtype, gives the same values in half the bytes to copy between
                      loader processes and to the device, which then casts (pretrain.py does this).
    strict:           records whose image is in no feature store are an AnnotationFormatError instead of being left
                      out with a warning (both name the annotation file, the count and the first img_ids).
    """

    def __init__(
        self,
        annotation_paths,
        feature_stores,
        answer_table,
        tokenizer,
        *,
        max_seq_length: int = 20,
        seed: int = 9595,
        word_mask_rate: float = 0.15,
        obj_mask_rate: float = 0.15,
        task_matched: bool = True,
        qa_from_epoch: int = 0,
        sources: Iterable[str] | None = None,
        feature_dtype=np.float32,
        strict: bool = False,
    ):
        if isinstance(annotation_paths, str | Path):
            annotation_paths = [annotation_paths]
        if isinstance(feature_stores, str | Path | FeatureStore):
            feature_stores = [feature_stores]
        if max_seq_length < 3:
            raise ValueError(f"max_seq_length must be at least 3 ([CLS] word [SEP]), got {max_seq_length}")
        self.stores = [as_feature_store(s) for s in feature_stores]
        if not self.stores:
            raise ValueError("no feature stores given")
        self.answer_table = answer_table if isinstance(answer_table, AnswerTable) else AnswerTable(answer_table)
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.word_mask_rate = word_mask_rate
        self.obj_mask_rate = obj_mask_rate
        self.task_matched = task_matched
        self.qa_from_epoch = qa_from_epoch
        self.strict = strict
        self.epoch = 0
        self.feature_dtype = np.dtype(feature_dtype)
        if self.feature_dtype not in (np.float16, np.float32):
            raise ValueError(f"feature_dtype must be float16 or float32, got {self.feature_dtype}")

        dims = {(s.feat_dim, s.max_boxes) for s in self.stores}
        if len(dims) != 1:
            raise ValueError(f"feature stores disagree on (feat_dim, max_boxes): {sorted(dims)}")
        self.feat_dim, self.max_boxes = dims.pop()

        self._load(list(annotation_paths), None if sources is None else set(sources))
        check_tokenizer(self.tokenizer, [self.sentence(i) for i in range(min(64, len(self)))])
        self.vocab_size = len(self.tokenizer)
        self._special = (
            self.tokenizer.cls_token_id,
            self.tokenizer.sep_token_id,
            self.tokenizer.pad_token_id,
            self.tokenizer.mask_token_id,
        )

    # -- loading --------------------------------------------------------------------------------------------------

    def _load(self, paths: list, sources: set | None) -> None:
        # Global image index over all stores (an img_id in several must have the same contents in each).
        located = index_images(self.stores)
        image_of = {img_id: i for i, img_id in enumerate(located)}
        cols, source_ids, dropped_sents, missing = self._read_sentences(paths, sources, image_of)
        message = missing_images_message(missing, self.stores) if missing else "none of the sources asked for"
        if missing:
            if self.strict:
                raise AnnotationFormatError(f"{message} (refused: strict)")
            logger.warning("left out %d sentences of %s (--strict makes this an error)", dropped_sents, message)
        self.num_dropped = dropped_sents
        if not cols.text_end:
            raise ValueError(f"no usable sentences in {', '.join(str(p) for p in paths)}: {message}")

        self._text = np.frombuffer(cols.text, dtype=np.uint8)  # views, no copies: the columns are the arrays
        self._text_end = np.frombuffer(cols.text_end, dtype=np.int64)
        self._img = np.frombuffer(cols.img, dtype=np.int64)
        self._src = np.frombuffer(cols.src, dtype=np.int16)
        self._sent_idx = np.frombuffer(cols.idx, dtype=np.int32)
        self._is_question = np.frombuffer(cols.is_question, dtype=np.int8).view(bool)
        self._lab_end = np.frombuffer(cols.lab_end, dtype=np.int64)
        self._ans = np.frombuffer(cols.ans, dtype=np.int64)
        self._score = np.frombuffer(cols.score, dtype=np.float64)
        self._img_store = np.asarray([k for k, _ in located.values()], dtype=np.int16)
        self._img_row = np.asarray([row for _, row in located.values()], dtype=np.int64)
        self._img_ids = list(located)
        self._img_boxes = np.zeros(len(located), dtype=np.int64)  # real boxes of each image, read once here
        for k, store in enumerate(self.stores):
            mine = np.flatnonzero(self._img_store == k)
            self._img_boxes[mine] = np.asarray(store.num_boxes)[self._img_row[mine]]
        self._box_index = np.arange(self.max_boxes)
        self._source_names = list(source_ids)
        logger.info(
            "pre-training data: %d sentences (%d questions) of %d images from %s",
            len(self),
            int(self._is_question.sum()),
            len(np.unique(self._img)),
            ", ".join(str(p) for p in paths),
        )
        if self.task_matched and len(np.unique(self._img)) < 2:
            raise ValueError("the matching task needs sentences of at least two images")

    def _read_sentences(
        self, paths: list, sources: set | None, image_of: dict[str, int]
    ) -> tuple[_SentenceColumns, dict[str, int], int, dict[str, list[str]]]:
        """Read the sentences of the asked-for sources whose image a store holds. Returns (their columns,
        {source: id}, the number of sentences left out for lack of features, {annotation file: [img_id of each
        record without features]})."""
        cols = _SentenceColumns()
        source_ids: dict[str, int] = {}
        dropped_sents = 0
        missing: dict[str, list[str]] = {}
        for path in paths:
            for datum in iter_pretrain_json(path):  # one record at a time: never the whole file
                img = image_of.get(datum["img_id"])
                labelf = datum.get("labelf", {})
                for src, sents in datum["sentf"].items():
                    if sources is not None and src not in sources:
                        continue
                    if img is None:
                        dropped_sents += len(sents)
                        continue
                    self._add_sentences(cols, sents, labelf.get(src), img, source_ids.setdefault(src, len(source_ids)))
                if img is None:
                    missing.setdefault(str(path), []).append(datum["img_id"])
        return cols, source_ids, dropped_sents, missing

    def _add_sentences(self, cols: _SentenceColumns, sents: list, labels: list | None, img: int, src: int) -> None:
        """Append one record's sentences of one source; `labels` (questions only): one answer dict per sentence,
        mapped through the answer table (unknown answers dropped)."""
        for i, sent in enumerate(sents):
            cols.text += sent.strip().encode("utf-8")
            cols.text_end.append(len(cols.text))
            cols.img.append(img)
            cols.src.append(src)
            cols.idx.append(i)
            cols.is_question.append(labels is not None)
            if labels is not None:
                known = self.answer_table.label_scores(labels[i])
                cols.ans.extend(known)
                cols.score.extend(known.values())
            cols.lab_end.append(len(cols.ans))

    # -- accessors ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._text_end)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws __getitem__ makes (call before creating each epoch's iterator)."""
        self.epoch = int(epoch)

    @property
    def qa_enabled(self) -> bool:
        return self.epoch >= self.qa_from_epoch

    def sentence(self, index: int) -> str:
        start = self._text_end[index - 1] if index > 0 else 0
        return self._text[start : self._text_end[index]].tobytes().decode("utf-8")

    def img_id(self, index: int) -> str:
        return self._img_ids[self._img[index]]

    def text_length_stats(self, samples: int = 4096) -> tuple[float, float]:
        """Mean and standard deviation of the text length in tokens ([CLS] and [SEP] included, truncated as the
        items are) over up to ``samples`` evenly spaced sentences: what StaticShapes.from_statistics needs."""
        indices = np.linspace(0, len(self) - 1, num=min(samples, len(self))).astype(np.int64)
        pieces = self.tokenizer([self.sentence(int(i)) for i in indices], add_special_tokens=False)["input_ids"]
        lengths = np.array([min(len(p), self.max_seq_length - 2) + 2 for p in pieces], dtype=np.float64)
        return float(lengths.mean()), float(lengths.std())

    def uid(self, index: int) -> str:
        return make_uid(self.img_id(index), self._source_names[self._src[index]], int(self._sent_idx[index]))

    def slot_bytes(self, batch: int) -> int:
        """Room for a compact batch of ``batch`` items (a batch_ring slot): every word piece masked, and twice the
        expected number of objects replaced by another's feature, plus 64 (a batch with more, which is rare, gets
        memory of its own)."""
        replaced = 2 * math.ceil(batch * self.max_boxes * self.obj_mask_rate * 0.1) + 64
        return buffer_size(compact_fields(batch, self.max_seq_length, self.max_boxes, self.feat_dim,
                                          self.feature_dtype, batch * (self.max_seq_length - 2), replaced))

    def _image(self, img: int):
        store = self.stores[self._img_store[img]]
        return store, int(self._img_row[img])

    # -- items ----------------------------------------------------------------------------------------------------

    def __getitem__(self, item) -> dict[str, np.ndarray]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence) -> PretrainBatch:
        """Many items at once (the DataLoader calls this for a whole batch): the same values as ``ds[i]`` for each,
        with one tokenizer call and the features read straight into the batch's one buffer (compact: each value
        once; pretrain_collate expands it, compact_pretrain_collate ships it as it is)."""
        keys = [item if isinstance(item, tuple) else (self.epoch, item) for item in items]
        for _, index in keys:  # before any draw: a bad index is an IndexError, as ds[index]
            self._check_index(int(index))
        draws = [self._draw(int(epoch), int(index), rng)
                 for (epoch, index), rng in zip(keys, item_generators(self.seed, keys), strict=True)]
        sentences = [self.sentence(d.sent_index) for d in draws]
        encoded = self.tokenizer(sentences, add_special_tokens=False)["input_ids"]
        tokens = [np.asarray(t[: self.max_seq_length - 2], dtype=np.int64) for t in encoded]
        masked_words = sum(int((d.word_p[: len(t)] < self.word_mask_rate).sum()) for d, t in zip(draws, tokens,
                                                                                                   strict=True))
        replaced = sum(len(d.replaced) for d in draws)
        batch = CompactBatch.allocate(compact_fields(len(draws), self.max_seq_length, self.max_boxes, self.feat_dim,
                                                     self.feature_dtype, masked_words, replaced))
        arrays = batch.arrays()
        self._fill_text(arrays, draws, tokens)
        self._fill_objects(arrays, draws)
        arrays["matched_label"][:] = [d.matched for d in draws]
        arrays["ans"][:] = [d.ans for d in draws]
        return PretrainBatch(batch)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(index)

    def _draw(self, epoch: int, index: int, rng: np.random.Generator | None = None) -> _Draw:
        """Every random choice of one item, in a fixed order from its own generator: default_rng([seed, epoch,
        index]), or ``rng`` in that state (item_rng.item_generators makes a batch's faster)."""
        self._check_index(index)
        rng = np.random.default_rng([self.seed, epoch, index]) if rng is None else rng
        # Fixed-size draws first (objects, then words, both padded to their maximum count), variable-size ones
        # last, so that e.g. the sentence length never shifts the object masking.
        obj_p = rng.random(self.max_boxes)
        word_p = rng.random(self.max_seq_length - 2)
        word_random_ids = rng.integers(self.vocab_size, size=self.max_seq_length - 2)
        img = int(self._img[index])

        sent_index, matched = index, 1
        if self.task_matched and rng.random() < 0.5:
            matched = 0
            sent_index = int(rng.integers(len(self)))
            while self._img[sent_index] == img:
                sent_index = int(rng.integers(len(self)))

        # As for words (below): p < 0.8 rate zeroed, < 0.9 rate replaced, < rate kept.
        rate = self.obj_mask_rate
        masked = (obj_p < rate) & (self._box_index < self._img_boxes[img])
        replaced = []
        for i in np.flatnonzero(masked & (obj_p >= 0.8 * rate) & (obj_p < 0.9 * rate)):
            # As the original's random_feat(): a random sentence's image, a random object of it.
            other = int(self._img[rng.integers(len(self))])
            replaced.append((int(i), *self._image(other), int(rng.integers(int(self._img_boxes[other])))))

        ans = IGNORE_INDEX
        start = self._lab_end[index - 1] if index > 0 else 0
        end = self._lab_end[index]
        if matched and end > start and epoch >= self.qa_from_epoch:
            scores = self._score[start:end]
            if end - start == 1:
                choice = 0
            else:
                total = scores.sum()
                p = scores / total if total > 0 else np.full(len(scores), 1.0 / len(scores))
                choice = int(rng.choice(len(scores), p=p))
            ans = int(self._ans[start + choice])
        return _Draw(sent_index, matched, word_p, word_random_ids, img, obj_p, masked, replaced, ans)

    def _fill_text(self, arrays: dict, draws: list[_Draw], tokens: list[np.ndarray]) -> None:
        cls_id, sep_id, pad_id, mask_id = self._special
        input_ids, word_masked, masked_words = arrays["input_ids"], arrays["word_masked"], arrays["masked_words"]
        input_ids[:], word_masked[:] = pad_id, 0
        rate, at = self.word_mask_rate, 0
        for k, (d, words) in enumerate(zip(draws, tokens, strict=True)):
            n = len(words)
            # One uniform per token decides both "masked?" (p < rate) and which replacement: the original rescales
            # p by 1/rate and compares with 0.8 / 0.9, i.e. p < 0.8 rate -> [MASK], p < 0.9 rate -> random, else
            # kept.
            p, random_ids = d.word_p[:n], d.word_random_ids[:n]
            masked_tokens = words.copy()
            masked_tokens[p < 0.8 * rate] = mask_id
            swap = (p >= 0.8 * rate) & (p < 0.9 * rate)
            masked_tokens[swap] = random_ids[swap]
            input_ids[k, 0], input_ids[k, 1 : n + 1], input_ids[k, n + 1] = cls_id, masked_tokens, sep_id
            masked = p < rate
            word_masked[k, 1 : n + 1] = masked
            labelled = words[masked]
            masked_words[at : at + len(labelled)] = labelled
            at += len(labelled)
        arrays["text_length"][:] = [len(words) + 2 for words in tokens]

    def _fill_objects(self, arrays: dict, draws: list[_Draw]) -> None:
        rate = self.obj_mask_rate
        imgs = np.fromiter((d.img for d in draws), dtype=np.int64, count=len(draws))
        store_of, rows = self._img_store[imgs], self._img_row[imgs]
        for k in np.unique(store_of):  # one gathered read per array and store, not one per image
            items = np.flatnonzero(store_of == k)
            for name, field in _STORE_ARRAYS.items():
                self.stores[k].gather(field, rows[items], arrays[name], items)
        # As for words: of the masked objects, p < 0.8 rate zeroed, < 0.9 rate replaced, the rest kept.
        obj_p = np.stack([d.obj_p for d in draws])
        how = np.where(obj_p < 0.8 * rate, ZEROED, np.where(obj_p < 0.9 * rate, REPLACED, KEPT))
        arrays["object_codes"][:] = np.where(np.stack([d.masked for d in draws]), how, UNMASKED)
        replaced = [(k * self.max_boxes + i, other_store, other_row, j)
                    for k, d in enumerate(draws) for i, other_store, other_row, j in d.replaced]
        for n, (at, other_store, other_row, j) in enumerate(replaced):
            arrays["replaced_at"][n] = at
            arrays["replacement_features"][n] = other_store.features[other_row, j]


_STORE_ARRAYS = {"features": "features", "visual_pos": "boxes", "num_boxes": "num_boxes", "obj_ids": "obj_ids",
                 "obj_conf": "obj_conf", "attr_ids": "attr_ids", "attr_conf": "attr_conf"}  # batch <- store


class _Draw(NamedTuple):
    """One item's random choices (PretrainDataset._draw)."""

    sent_index: int  # the item's own sentence, or another image's when mismatched
    matched: int
    word_p: np.ndarray  # (max_seq_length - 2,) uniforms: which word pieces are masked, and how
    word_random_ids: np.ndarray  # replacement ids for the "random word" case
    img: int
    obj_p: np.ndarray  # (max_boxes,) uniforms: which objects are masked, and how
    masked: np.ndarray  # (max_boxes,) bool: masked real objects
    replaced: list  # (object, store, row, object of that row) for each object replaced by another's feature
    ans: int


class PretrainBatch(Sequence):
    """What ``PretrainDataset.__getitems__`` returns: the batch as a CompactBatch (``.compact``), and the sequence of
    dense items that the DataLoader protocol expects (torch's default_collate stacks them as usual), each a view into
    ``arrays``: the dense batch, stacked along a first dimension, built on first use."""

    def __init__(self, compact: CompactBatch):
        self.compact = compact
        self._arrays = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = dense_arrays(self.compact)
        return self._arrays

    def __len__(self) -> int:
        return len(self.compact)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {key: value[i] for key, value in self.arrays.items()}


def pretrain_collate(items) -> dict:
    """Stack PretrainDataset items into the keyword arguments of transformers' LxmertForPreTraining.forward:
    input_ids / attention_mask / token_type_ids / labels (B, L) long, visual_feats (B, 36, F) float32,
    visual_pos (B, 36, 4) float32, visual_attention_mask (B, 36) long, obj_labels {"obj": (ids (B, 36) long,
    conf (B, 36) float32), "attr": (ids, conf), "feat": (features (B, 36, F) float32, mask (B, 36) float32)},
    matched_label (B,) long, ans (B,) long (-100: no QA label).

    From the PretrainBatch that the dataset's ``__getitems__`` gives a DataLoader, the dense batch is built once."""
    if isinstance(items, PretrainBatch):
        stacked = items.arrays
    else:
        stacked = {key: np.stack([item[key] for item in items]) for key in items[0]}
    return forward_kwargs({key: torch.from_numpy(value) for key, value in stacked.items()})


def compact_pretrain_collate(items):
    """The batch as it should travel: the CompactBatch of a PretrainBatch (the objective's prepare expands it on
    the device: pretrain_batch.pretrain_inputs); other items are stacked densely as by pretrain_collate."""
    return items.compact if isinstance(items, PretrainBatch) else pretrain_collate(items)


def to_device(batch, device, float_dtype=None):
    """Move a collated batch (tensors in dicts, tuples and lists) to ``device``; floating tensors become
    ``float_dtype`` when given (features travel as float16 and are cast on the device)."""
    if isinstance(batch, torch.Tensor):
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=float_dtype, non_blocking=True)
        return batch.to(device=device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, float_dtype) for v in batch)
    return batch
