"""The pre-training batch as it travels: compact on the host, expanded into the model's inputs on the device.

The dense batch (the keyword arguments of LxmertForPreTraining.forward) carries the RoI features twice (masked and
as the target) and float32 masks: 284 KiB a sample at F = 2048. The compact batch carries every value once, in its
smallest exact form, in ONE byte buffer: one shared-memory segment when a DataLoader worker builds it, which then
crosses to the main process without a copy, and one copy to the device.

    features (B, N, F)            the unmasked features (the feat target), in the dataset's feature dtype
    object_codes (B, N) uint8     UNMASKED, ZEROED, REPLACED or KEPT (masked objects: the last three)
    replaced_at (R,) int64        flat index b * N + i of each replaced object, in row-major order
    replacement_features (R, F)   the feature each of them is replaced with (another image's object)
    visual_pos (B, N, 4) float32, num_boxes (B,) int32, obj_ids / attr_ids (B, N) int64, obj_conf / attr_conf
    input_ids (B, L) int32        the text as the model reads it ([MASK] and random words in place)
    word_masked (B, L) uint8      1 where the masked-LM label is the original word piece
    masked_words (M,) int32       those word pieces, in row-major order
    text_length (B,) int32        [CLS] + words + [SEP]; padding follows
    matched_label, ans (B,) int64

``pretrain_inputs(batch, device)`` expands it: the text on the host (the loop checks a batch against the static
shapes on host tensors, without waiting for the device), the rest on ``device`` after one copy of the buffer. The
values are exactly those of the dense batch, which ``dense_arrays`` builds on the host the same way.

Public API
    CompactBatch(buffer, fields)     .allocate(fields), .views(buffer=None), .arrays(), .pin_memory(), len(), .nbytes
    compact_fields(...) -> fields    the layout of a batch of given sizes; buffer_size(fields) its bytes
    UNMASKED, ZEROED, REPLACED, KEPT object codes
    dense_arrays(batch) -> dict      the dense batch's flat numpy arrays (the dataset's items)
    pretrain_inputs(batch, device=None) -> dict   the forward's keyword arguments; a dense batch is returned as is
    forward_kwargs(flat) -> dict     flat tensors -> the forward's nested keyword arguments
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lxmert_fast.model.static_shapes import IGNORE_INDEX

from . import batch_ring

UNMASKED, ZEROED, REPLACED, KEPT = 0, 1, 2, 3
_ALIGN = 64  # every array starts on a cache line (and any dtype's alignment)


def compact_fields(batch: int, text_len: int, boxes: int, feat_dim: int, feature_dtype, masked_words: int,
                   replaced: int) -> tuple:
    """The layout of a compact batch: ((name, torch dtype, shape), ...)."""
    feat = torch.from_numpy(np.empty(0, dtype=feature_dtype)).dtype
    return (
        ("features", feat, (batch, boxes, feat_dim)),
        ("object_codes", torch.uint8, (batch, boxes)),
        ("replaced_at", torch.int64, (replaced,)),
        ("replacement_features", feat, (replaced, feat_dim)),
        ("visual_pos", torch.float32, (batch, boxes, 4)),
        ("num_boxes", torch.int32, (batch,)),
        ("obj_ids", torch.int64, (batch, boxes)),
        ("obj_conf", torch.float32, (batch, boxes)),
        ("attr_ids", torch.int64, (batch, boxes)),
        ("attr_conf", torch.float32, (batch, boxes)),
        ("input_ids", torch.int32, (batch, text_len)),
        ("word_masked", torch.uint8, (batch, text_len)),
        ("masked_words", torch.int32, (masked_words,)),
        ("text_length", torch.int32, (batch,)),
        ("matched_label", torch.int64, (batch,)),
        ("ans", torch.int64, (batch,)),
    )


def _placed(fields):
    """(name, dtype, shape, start, nbytes) of each field, and the buffer's size."""
    out, start = [], 0
    for name, dtype, shape in fields:
        nbytes = math.prod(shape) * dtype.itemsize
        out.append((name, dtype, shape, start, nbytes))
        start += -(-nbytes // _ALIGN) * _ALIGN
    return out, start


def _zero_padding(buffer: torch.Tensor, fields) -> None:
    placed, size = _placed(fields)
    ends = [start + nbytes for _, _, _, start, nbytes in placed]
    for end, next_start in zip(ends, [start for *_, start, _ in placed[1:]] + [size], strict=True):
        buffer[end:next_start] = 0


def buffer_size(fields) -> int:
    """The bytes of a compact batch laid out by ``fields``."""
    return _placed(fields)[1]


class CompactBatch:
    """One compact pre-training batch: a uint8 ``buffer`` holding the arrays that ``fields`` lays out."""

    def __init__(self, buffer: torch.Tensor, fields: tuple, slot: batch_ring.Slot | None = None):
        self.buffer, self.fields, self.slot = buffer, fields, slot

    @classmethod
    def allocate(cls, fields) -> CompactBatch:
        """An uninitialised batch; in a DataLoader worker its buffer is shared memory from the start, so that the
        worker's queue sends a handle instead of copying the batch: a slot of the loader's ring when it has one
        free (batch_ring: reused, nothing to map or fault in), else a fresh segment."""
        size = buffer_size(fields)
        claimed = batch_ring.claim(size) if torch.utils.data.get_worker_info() is not None else None
        if claimed is not None:
            batch = cls(claimed[0], fields, claimed[1])
        elif torch.utils.data.get_worker_info() is None:
            batch = cls(torch.empty(size, dtype=torch.uint8), fields)
        else:
            batch = cls(torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size)), fields)
        _zero_padding(batch.buffer, fields)  # the bytes between the arrays are zeros wherever a batch is built
        return batch

    def __reduce__(self):
        # a batch in a ring's slot travels as the slot's number; any other as its buffer (torch shares it)
        if self.slot is not None and self.slot.owned:
            return _received, (self.slot.sent(), self.fields)
        return CompactBatch, (self.buffer, self.fields)

    def views(self, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The arrays as tensors viewing ``buffer`` (default: this batch's; or a copy of it, e.g. on a device)."""
        buffer = self.buffer if buffer is None else buffer
        placed, _ = _placed(self.fields)
        return {name: buffer[start : start + nbytes].view(dtype).view(shape)
                for name, dtype, shape, start, nbytes in placed}

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as numpy views of the host buffer (to fill them)."""
        return {name: view.numpy() for name, view in self.views().items()}

    def pin_memory(self) -> CompactBatch:
        """What a DataLoader with pin_memory=True calls: the buffer in page-locked memory, one copy; none when it
        is there already (a slot of a pinned batch_ring)."""
        if self.buffer.is_pinned():
            return self
        return CompactBatch(self.buffer.pin_memory(), self.fields)

    def __len__(self) -> int:
        return self.fields[0][2][0]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def _received(slot: tuple, fields: tuple) -> CompactBatch:
    return CompactBatch(batch_ring.receive(*slot), fields)


def _text(v: dict) -> dict[str, torch.Tensor]:
    input_ids = v["input_ids"].long()
    batch, length = input_ids.shape
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    labels[v["word_masked"].bool()] = v["masked_words"].long()
    attention_mask = (torch.arange(length) < v["text_length"][:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids),
            "labels": labels}


def _objects(v: dict) -> dict[str, torch.Tensor]:
    features, codes = v["features"], v["object_codes"]
    batch, boxes, feat_dim = features.shape
    visual_feats = torch.where((codes == ZEROED)[..., None], 0, features)  # (masked_fill is slow on CPUs)
    visual_feats.view(batch * boxes, feat_dim).index_copy_(0, v["replaced_at"], v["replacement_features"])
    boxes_range = torch.arange(boxes, device=features.device)
    return {
        "visual_feats": visual_feats,
        "visual_pos": v["visual_pos"],
        "visual_attention_mask": (boxes_range < v["num_boxes"][:, None]).long(),
        "obj_ids": v["obj_ids"],
        "obj_conf": v["obj_conf"],
        "attr_ids": v["attr_ids"],
        "attr_conf": v["attr_conf"],
        "feat_target": features,
        "feat_mask": (codes != UNMASKED).float(),
        "matched_label": v["matched_label"],
        "ans": v["ans"],
    }


def dense_arrays(batch: CompactBatch) -> dict[str, np.ndarray]:
    """The dense batch as flat numpy arrays (the keys of the dataset's items), built on the host."""
    views = batch.views()
    return {key: value.numpy() for key, value in {**_text(views), **_objects(views)}.items()}


def forward_kwargs(flat: dict) -> dict:
    """Flat tensors (the items' keys) -> the keyword arguments of transformers' LxmertForPreTraining.forward."""
    return {
        "input_ids": flat["input_ids"],
        "attention_mask": flat["attention_mask"],
        "token_type_ids": flat["token_type_ids"],
        "visual_feats": flat["visual_feats"],
        "visual_pos": flat["visual_pos"],
        "visual_attention_mask": flat["visual_attention_mask"],
        "labels": flat["labels"],
        "obj_labels": {
            "obj": (flat["obj_ids"], flat["obj_conf"]),
            "attr": (flat["attr_ids"], flat["attr_conf"]),
            "feat": (flat["feat_target"], flat["feat_mask"]),
        },
        "matched_label": flat["matched_label"],
        "ans": flat["ans"],
    }


def pretrain_inputs(batch, device=None) -> dict:
    """The forward's keyword arguments from a collated batch. A CompactBatch is expanded: the text on the host,
    the objects on ``device`` (default: the host) after one copy of its buffer there. A dense batch (a dict) is
    returned as it is."""
    if not isinstance(batch, CompactBatch):
        return batch
    host = batch.views()
    on_device = host if device is None else batch.views(batch.buffer.to(device, non_blocking=True))
    return forward_kwargs({**_text(host), **_objects(on_device)})
