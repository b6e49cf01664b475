"""Which of an image's ~300 regions become its TSV rows, and with which labels.

Two rules, both on the detector's per-region outputs (FasterRCNN.forward):
  "butd"  the original bottom-up-attention feature extraction (generate_tsv.py), the one that made LXMERT's
          released features: NMS at 0.3 for every class separately over the proposal boxes (pixel-inclusive IoU,
          in the original image's pixels); a region's confidence is its best score among the classes it survived;
          regions with confidence >= 0.2 are kept, at least `min_boxes` and at most `max_boxes` of them (the most
          confident); 36 / 36 gives the released files, 10 / 100 the adaptive variant. The boxes written are the
          proposals (whose RoI-pooled features these are), the attribute confidence a softmax over all attributes
          and "no attribute".
  "hf"    transformers' research FRCNN (examples/research_projects/lxmert): each region's most likely class and
          that class's regressed box, one class-agnostic NMS, tried at each threshold of `hf_nms` until it leaves
          between `min_boxes` and `max_boxes` regions; attribute confidence a softmax without "no attribute".
          For parity with that code; its boxes are regressed while its features are those of the proposals.
Background is the last class and "no attribute" the last attribute (the hub's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lxmert_fast.detector.boxes import clip_boxes_, nms, nms_per_class


@dataclass
class Selection:
    rule: str = "butd"  # "butd" (the original's) or "hf" (transformers' research FRCNN)
    min_boxes: int = 36
    max_boxes: int = 36
    conf_thresh: float = 0.2  # butd
    nms_thresh: float = 0.3  # butd, per class
    hf_nms: tuple = (0.5, 0.6, 0.7)  # hf, tried in order

    def __post_init__(self):
        if self.rule not in ("butd", "hf"):
            raise ValueError(f"selection rule must be 'butd' or 'hf', got {self.rule!r}")
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 1 <= min_boxes <= max_boxes, got {self.min_boxes} and {self.max_boxes}")


def _to_raw(boxes: torch.Tensor, resized, raw) -> torch.Tensor:
    """Boxes from the resized image's pixels to the original's (float32 factors raw / resized, per axis)."""
    scale = torch.tensor(raw, dtype=torch.float32) / torch.tensor(resized, dtype=torch.float32)  # (y, x)
    out = boxes.clone()
    out[:, 0::2] *= scale[1].to(boxes.device)
    out[:, 1::2] *= scale[0].to(boxes.device)
    return out


def _butd(out: dict, resized, raw, sel: Selection):
    boxes = _to_raw(out["proposals"], resized, raw)
    num_classes = out["class_boxes"].shape[1] // 4
    scores = out["cls_probs"][:, :num_classes]
    kept = nms_per_class(boxes, scores, sel.nms_thresh, plus_one=True)
    max_conf = torch.where(kept, scores, torch.zeros_like(scores)).amax(1)
    keep = torch.nonzero(max_conf >= sel.conf_thresh).flatten()
    if not sel.min_boxes <= len(keep) <= sel.max_boxes:
        limit = sel.min_boxes if len(keep) < sel.min_boxes else sel.max_boxes
        keep = torch.sort(max_conf, descending=True, stable=True).indices[:limit]
    obj_conf, obj_id = scores[keep].max(1)
    num_attrs = out["attr_logits"].shape[1] - 1
    attr_conf, attr_id = out["attr_logits"][keep].softmax(-1)[:, :num_attrs].max(1)
    return keep, boxes[keep], obj_id, obj_conf, attr_id, attr_conf


def _hf(out: dict, resized, raw, sel: Selection):
    num_classes = out["class_boxes"].shape[1] // 4
    class_boxes = clip_boxes_(out["class_boxes"].reshape(-1, num_classes, 4).clone(), *resized)
    scores, classes = out["cls_probs"][:, :num_classes].max(1)
    boxes = class_boxes[torch.arange(len(classes), device=classes.device), classes]
    for thresh in sel.hf_nms:  # the research code stops at the first threshold that gives an allowed count
        keep = nms(boxes, scores, thresh)[: sel.max_boxes]
        if sel.min_boxes <= len(keep):
            break
    num_attrs = out["attr_logits"].shape[1] - 1
    attr_conf, attr_id = out["attr_logits"][keep][:, :num_attrs].softmax(-1).max(1)
    return keep, _to_raw(boxes[keep], resized, raw), classes[keep], scores[keep], attr_id, attr_conf


def select_regions(out: dict, resized: tuple, raw: tuple, sel: Selection) -> dict:
    """One image's TSV fields (numpy arrays) from its detector outputs; `resized`, `raw`: its (h, w) as the
    detector saw it and as stored."""
    if len(out["proposals"]) == 0:
        raise ValueError("the detector proposed no region for this image")
    keep, boxes, obj_id, obj_conf, attr_id, attr_conf = (_butd if sel.rule == "butd" else _hf)(out, resized, raw, sel)
    clip_boxes_(boxes, *raw)  # float32 rescaling may pass the border by a rounding error
    return {
        "img_h": int(raw[0]),
        "img_w": int(raw[1]),
        "objects_id": obj_id.cpu().numpy().astype("int64"),
        "objects_conf": obj_conf.cpu().numpy().astype("float32"),
        "attrs_id": attr_id.cpu().numpy().astype("int64"),
        "attrs_conf": attr_conf.cpu().numpy().astype("float32"),
        "num_boxes": len(keep),
        "boxes": boxes.cpu().numpy().astype("float32"),
        "features": out["features"][keep].cpu().numpy().astype("float32"),
    }
