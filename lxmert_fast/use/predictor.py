"""A fine-tuned LXMERT put to use: VQA / GQA answers with their scores (top-k on request), NLVR2 true / false.

    from lxmert_fast.use import Predictor

    predictor = Predictor.from_pretrained("output/finetune_vqa/best_model", features="data/val2014_obj36.tsv")
    predictor.ask("what color is the dog?", "COCO_val2014_000000000042")   # {"answer": "brown", "score": 0.91, ...}
    predictor.ask("what color is the dog?", "COCO_val2014_000000000042", top_k=3)   # adds "top_k": [...]
    predictor.judge("there is a dog in each image", "img_a", "img_b")      # {"prediction": True, "score": 0.88, ...}
    predictor.predict(records)        # records of a released annotation file, batched; one result per record

The model is a folder (or a hub id, read through the local hub cache) holding config.json, the weights and the
tokenizer (lxmert_fast.model.folder reads it). A VQA / GQA model's answers are its config's id2label; a folder
without them takes label2ans.json beside the weights or `answers=FILE` (a label2ans list or an ans2label object,
e.g. the original release's trainval_label2ans.json, which is how the hub's unc-nlp/lxmert-vqa-uncased and
-gqa-uncased get theirs). Features come from the released object-feature TSVs (converted once to lxmert_fast's
feature store) or stores. The command is lxmert_fast/predict.py.

Scores: the VQA / GQA heads are trained with a binary cross-entropy per answer, so an answer's score is the sigmoid
of its logit; NLVR2's is the softmax probability of the predicted truth value.

Speed (measured by benchmarks/bench_predict.py): questions are batched by length and padded to the longest in
their batch; the padded text is packed away inside the encoder only when a batch has enough padding to pay for
the gather and scatter (at batch 1 there is none). `fast=True` trades exactness for speed: on a CPU every linear
layer runs in int8 (dynamic quantisation: int8 weights, activations quantised per batch), on a GPU the model runs
under bf16 autocast.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lxmert_fast.data.finetune_dataset import read_annotations
from lxmert_fast.data.pretrain_dataset import as_feature_store, load_tokenizer
from lxmert_fast.errors import PredictionError
from lxmert_fast.files import write_text
from lxmert_fast.model.folder import read_task_model
from lxmert_fast.model.modeling import LxmertForNLVR2, LxmertForQuestionAnswering
from lxmert_fast.tasks.registry import ANSWER_TASKS, TASK_NAMES, TASKS, get_task

# Pack the padded text away only from this fraction of padding on: below it the gather and scatter around every
# token-wise layer cost more than the padded rows they save (benchmarks/bench_predict.py, full size, CPU).
PACK_MIN_PADDING = 0.2


def quantized_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose linear layers run in int8 (weights quantised per output channel, activations per
    batch: torch's dynamic quantisation, fbgemm on x86). CPU only; the plain PyTorch path."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    fast = copy.deepcopy(model)
    fast.backend = "torch"  # the fused kernels read weights that quantised layers no longer have
    with warnings.catch_warnings():  # torch's notices that these APIs move to torchao: nothing a user can act on
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*quantized tensor creation functions")
        return quantize_dynamic(fast, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


@dataclass
class _Item:
    """One question (one image) or NLVR2 statement (two images), ready to batch."""

    record: dict
    images: tuple  # ((store index, row), ...)


class Predictor:
    """A fine-tuned VQA / GQA / NLVR2 model, its tokenizer, answers and features, loaded once (see the module
    docstring). `task`: "vqa" or "gqa" for an answer classifier (only decides evaluation and submission formats;
    None: unknown), "nlvr2" for a pair model."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        label2ans: Sequence[str] | None = None,
        features=(),
        *,
        task: str | None = None,
        device=None,
        fast: bool = False,
        batch_size: int = 32,
        max_seq_length: int = 20,
        name: str = "the model",
    ):
        self.is_qa = isinstance(model, LxmertForQuestionAnswering)
        if not self.is_qa and not isinstance(model, LxmertForNLVR2):
            raise PredictionError(f"{name}: expected LxmertForQuestionAnswering or LxmertForNLVR2, not {type(model)}")
        kind = "a VQA / GQA question-answering model" if self.is_qa else "an NLVR2 model"
        if task is not None and (task in ANSWER_TASKS) != self.is_qa:
            raise PredictionError(f"task {task!r} does not fit {name}: it is {kind}")
        if task is not None and task not in TASK_NAMES:
            raise PredictionError(f"unknown task {task!r}: expected one of {TASK_NAMES}")
        self.task = task if task is not None else (None if self.is_qa else "nlvr2")
        self.name, self.kind = name, kind
        # the task's record fields and outputs (VQA's and GQA's are alike, so an unknown QA task reads as VQA)
        self.spec = TASKS[self.task or ANSWER_TASKS[0]]
        if self.is_qa:
            if label2ans is None or len(label2ans) != model.config.num_qa_labels:
                raise PredictionError(f"{name}: needs its answer list, one answer for each of its "
                                      f"{model.config.num_qa_labels} output rows")
            self.label2ans = list(label2ans)
        else:
            self.label2ans = None
        if batch_size < 1:
            raise PredictionError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size, self.max_seq_length = batch_size, max_seq_length
        self.tokenizer = load_tokenizer(tokenizer)
        if len(self.tokenizer) > model.config.vocab_size:
            raise PredictionError(
                f"the tokenizer has {len(self.tokenizer)} tokens but {name} only {model.config.vocab_size}: use the "
                "tokenizer it was trained with"
            )
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.fast = fast
        model = model.eval().to(self.device)
        self.exact_model = model
        if fast and self.device.type == "cpu":
            model = quantized_copy(model)
        self.model = model
        self.stores, self.feature_names, self._where = [], [], {}
        self.add_features(features)

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model,
        features=(),
        *,
        answers=None,
        tokenizer=None,
        task: str | None = None,
        device=None,
        fast: bool = False,
        batch_size: int = 32,
        max_seq_length: int = 20,
    ) -> Predictor:
        """Load a fine-tuned model folder or hub id (see the module docstring). `answers`: a label2ans / ans2label
        JSON file or a list, for folders whose config lacks id2label; `tokenizer`: for folders without one."""
        read = read_task_model(model, answers, tokenizer)
        return cls(
            read.model,
            read.tokenizer,
            read.label2ans,
            features,
            task=task if task is not None else read.task,  # else the folder's config says which task
            device=device,
            fast=fast,
            batch_size=batch_size,
            max_seq_length=max_seq_length,
            name=str(model),
        )

    def add_features(self, features) -> None:
        """Feature TSVs (converted once to a store beside them), store folders or FeatureStores; a comma-separated
        string or a list. An img_id in several is taken from the first."""
        if isinstance(features, str):
            features = [f for f in features.split(",") if f]
        elif not isinstance(features, list | tuple):
            features = [features]
        for source in features:
            store = as_feature_store(source)
            config = self.model.config
            if store.feat_dim != config.visual_feat_dim:
                raise PredictionError(
                    f"{source}: features have {store.feat_dim} dimensions, {self.name} expects {config.visual_feat_dim}"
                )
            k = len(self.stores)
            self.stores.append(store)
            self.feature_names.append(str(source))
            for img_id in store.img_ids:
                self._where.setdefault(img_id, (k, store.row(img_id)))

    def add_images(self, images, detector, img_ids=None, folder=None) -> list[str]:
        """Your own pictures (paths, PIL images or (h, w, 3) uint8 RGB arrays): their region features extracted by
        `detector` (a lxmert_fast.detector FeatureExtractor, or what load_detector takes: a hub id, a folder or a
        file) into a feature TSV in `folder` (a new temporary folder by default), then added like a feature file.
        Returns their img_ids (a path's file stem, else "image0", "image1", ...) for ask / judge / predict."""
        from lxmert_fast.data.formats import encode_tsv_row
        from lxmert_fast.detector import FeatureExtractor, load_detector
        from lxmert_fast.detector.extract import to_image_features

        images = list(images) if isinstance(images, list | tuple) else [images]
        ids = list(img_ids) if img_ids is not None else [
            Path(image).stem if isinstance(image, str | Path) else f"image{k}" for k, image in enumerate(images)]
        taken = [i for i in ids if i in self._where]
        if taken or len(set(ids)) != len(ids):
            raise PredictionError(f"img_id {(taken or ids)[0]!r} is already taken: give each picture its own img_id")
        extractor = detector if isinstance(detector, FeatureExtractor) else FeatureExtractor(
            load_detector(detector), device=self.device)
        if extractor.cfg.feature_dim != self.model.config.visual_feat_dim:
            raise PredictionError(f"the detector gives {extractor.cfg.feature_dim}-d region features, {self.name} "
                                  f"expects {self.model.config.visual_feat_dim}")
        records = extractor.extract_features(images, img_ids=ids)
        folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="lxmert_fast_images_"))
        tsv = folder / f"images_{len(self.stores)}.tsv"
        write_text(tsv, "".join(encode_tsv_row(to_image_features(record)) for record in records))
        self.add_features(str(tsv))
        return ids

    # -- questions in, answers out --------------------------------------------------------------------------------
    def ask(self, question: str, img_id: str, top_k: int | None = None) -> dict:
        """One VQA / GQA question about one image."""
        return self.predict([{"img_id": img_id, "sent": question}], top_k=top_k, source=None)[0]

    def judge(self, statement: str, left_img_id: str, right_img_id: str) -> dict:
        """One NLVR2 statement about an image pair: {"prediction": True | False, "score": its probability}."""
        return self.predict([{"img0": left_img_id, "img1": right_img_id, "sent": statement}], source=None)[0]

    def predict_file(self, path, top_k: int | None = None) -> list[dict]:
        """Every record of a released VQA / GQA / NLVR2 annotation file (labels optional), in file order."""
        return self.predict(self.read_file(path), top_k=top_k, source=str(path))

    def read_file(self, path) -> list[dict]:
        """The validated records of an annotation file, after checking it holds this model's kind of record."""
        path = Path(path)
        return read_annotations(path, self._file_task(path), require_labels=False)

    def predict(self, records: Sequence[dict], top_k: int | None = None, source: str | None = "records") -> list[dict]:
        """One result per record, in order. Records as in the released annotation files: VQA / GQA
        {"question_id" (optional), "img_id", "sent"}, NLVR2 {"identifier" (optional), "img0", "img1", "sent"}.

        VQA / GQA: {"question_id", "img_id", "question", "answer", "score"}, plus "top_k": [{"answer", "score"}, ...]
        (best first, k of them) when top_k is given. NLVR2: {"identifier", "img0", "img1", "statement",
        "prediction": bool, "score"}. `source` names the records in error messages (a file name, say)."""
        if top_k is not None and not self.is_qa:
            raise PredictionError("top_k is for VQA / GQA answers; an NLVR2 model answers true or false")
        if top_k is not None and not 1 <= top_k <= len(self.label2ans):
            raise PredictionError(f"top_k must be between 1 and the {len(self.label2ans)} answers, got {top_k}")
        items = [self._item(record, k, source) for k, record in enumerate(records)]
        if not items:
            return []
        ids = self.tokenizer(
            [item.record["sent"].strip() for item in items],
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        # questions of similar length share a batch: less padding to compute or pack away
        order = sorted(range(len(items)), key=lambda i: len(ids[i]), reverse=True)
        results: list[dict | None] = [None] * len(items)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self.make_batch([ids[i] for i in chunk], [items[i].images for i in chunk])
            logits = self.logits(batch)
            for i, result in zip(chunk, self._results(logits, top_k), strict=True):
                results[i] = {**self._describe(items[i].record), **result}
        return results

    # -- the steps of predict, public for benchmarks and other tools ------------------------------------------
    def make_batch(self, token_ids: Sequence[Sequence[int]], images: Sequence[tuple]) -> dict:
        """Model inputs on the device: text padded to its longest row, features of (store, row) pairs (two per
        item for NLVR2). A mask with nothing masked is left out (None): the same result, less work."""
        lengths = [len(t) for t in token_ids]
        batch_size, length = len(token_ids), max(lengths)
        input_ids = np.full((batch_size, length), self.tokenizer.pad_token_id, dtype=np.int64)
        for row, tokens in enumerate(token_ids):
            input_ids[row, : len(tokens)] = tokens
        real_tokens = sum(lengths)
        attention_mask = None
        if real_tokens < batch_size * length:
            real = np.arange(length)[None, :] < np.array(lengths)[:, None]  # (B, L)
            attention_mask = torch.from_numpy(real.astype(np.int64))
        flat = [image for pair in images for image in pair]  # (B * images per item)
        feats = np.stack([self.stores[s].features[r] for s, r in flat])  # (B', V, F) float16
        boxes = np.stack([self.stores[s].boxes[r] for s, r in flat])  # (B', V, 4)
        num_boxes = np.array([int(self.stores[s].num_boxes[r]) for s, r in flat])
        objects = feats.shape[1]
        visual_mask = None
        if (num_boxes < objects).any():
            visual_mask = torch.from_numpy((np.arange(objects)[None, :] < num_boxes[:, None]).astype(np.int64))
        per_item = len(images[0])
        visual_feats = torch.from_numpy(feats).float()
        visual_pos = torch.from_numpy(boxes).float()
        if per_item > 1:  # NLVR2: (B, 2, V, ...)
            visual_feats = visual_feats.unflatten(0, (batch_size, per_item))
            visual_pos = visual_pos.unflatten(0, (batch_size, per_item))
            visual_mask = None if visual_mask is None else visual_mask.unflatten(0, (batch_size, per_item))
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros(batch_size, length, dtype=torch.int64),
            "visual_feats": visual_feats,
            "visual_pos": visual_pos,
            "visual_attention_mask": visual_mask,
        }
        batch = {k: None if v is None else v.to(self.device, non_blocking=True) for k, v in batch.items()}
        batch["padding_fraction"] = 1.0 - real_tokens / (batch_size * length)
        return batch

    def logits(self, batch: dict) -> torch.Tensor:
        """(B, answers) or (B, 2) float32 logits of a make_batch batch."""
        inputs = {k: v for k, v in batch.items() if k != "padding_fraction"}
        encoder = self.model.lxmert
        encoder.pack_text = batch.get("padding_fraction", 1.0) >= PACK_MIN_PADDING
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.fast and self.device.type == "cuda" else nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self.model(**inputs, return_dict=True)
        logits = getattr(out, self.spec.logits_field)
        return logits.float()

    def _results(self, logits: torch.Tensor, top_k: int | None) -> list[dict]:
        if self.is_qa:
            scores, labels = logits.sigmoid().topk(top_k or 1, dim=-1)  # best first
            scores, labels = scores.cpu().tolist(), labels.cpu().tolist()  # one transfer, not one per element
            out = []
            for row_scores, row_labels in zip(scores, labels, strict=True):
                result = {"answer": self.label2ans[row_labels[0]], "score": row_scores[0]}
                if top_k is not None:
                    result["top_k"] = [
                        {"answer": self.label2ans[a], "score": s} for a, s in zip(row_labels, row_scores, strict=True)
                    ]
                out.append(result)
            return out
        probs = logits.softmax(dim=-1).cpu().tolist()
        return [{"prediction": p[1] > p[0], "score": max(p)} for p in probs]

    # -- records ------------------------------------------------------------------------------------------------
    def _file_task(self, path: Path) -> str:
        """The read_annotations task for `path`, after checking that the file holds this model's kind of record."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise PredictionError(f"annotation file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise PredictionError(f"{path}: not valid JSON ({error})") from None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        holds_pairs = "img0" in first or "identifier" in first
        holds_questions = "img_id" in first or "question_id" in first
        if self.is_qa and holds_pairs:
            raise PredictionError(f"{path} holds NLVR2 statements (identifier, img0, img1), but {self.name} is "
                                  f"{self.kind}")
        if not self.is_qa and holds_questions:
            raise PredictionError(f"{path} holds VQA / GQA questions (question_id, img_id), but {self.name} is "
                                  f"{self.kind}")
        return self.task or "vqa"  # VQA and GQA files are validated alike

    def _item(self, record: dict, k: int, source: str) -> _Item:
        id_key = self.spec.id_field
        if source is None:  # one typed question or statement
            where = "the question" if self.is_qa else "the statement"
        elif not isinstance(record, dict):
            raise PredictionError(f"{source}: record {k}: expected an object, got {type(record).__name__}")
        else:
            where = f"{source}: record {k}" + (f" ({id_key} {record[id_key]!r})" if id_key in record else "")
        image_keys = self.spec.image_fields
        other = ("img0", "img1") if self.is_qa else ("img_id",)
        if any(key in record for key in other) and not all(key in record for key in image_keys):
            raise PredictionError(f"{where}: has {', '.join(k for k in other if k in record)}, which {self.name} "
                                  f"({self.kind}) does not take; it needs {', '.join(image_keys)}")
        sent = record.get("sent")
        if not isinstance(sent, str) or not sent.strip():
            raise PredictionError(f"{where}: 'sent' is missing, empty or not a string: {sent!r}")
        images = []
        for key in image_keys:
            img_id = record.get(key)
            if not isinstance(img_id, str) or not img_id:
                raise PredictionError(f"{where}: missing or non-string {key!r}")
            if img_id not in self._where:
                files = ", ".join(self.feature_names) or "none given"
                raise PredictionError(f"{where}: image {img_id!r} is not in the feature files ({files})")
            images.append(self._where[img_id])
        return _Item(record, tuple(images))

    def _describe(self, record: dict) -> dict:
        if self.is_qa:
            head = {"question_id": record["question_id"]} if "question_id" in record else {}
            return {**head, "img_id": record["img_id"], "question": record["sent"]}
        head = {"identifier": record["identifier"]} if "identifier" in record else {}
        return {**head, "img0": record["img0"], "img1": record["img1"], "statement": record["sent"]}


def submission_predictions(task: str, results: Sequence[dict]) -> dict:
    """Predictions keyed by question_id / identifier as lxmert_fast.tasks.scoring takes them: answer strings for VQA /
    GQA, 0 / 1 for NLVR2."""
    spec = get_task(task)
    if spec.answers:
        return {r[spec.id_field]: r["answer"] for r in results}
    return {r[spec.id_field]: int(r["prediction"]) for r in results}
