"""Box operations of the bottom-up-attention detector in plain PyTorch: IoU, NMS, box coding and Caffe's RoIPool.

torchvision's compiled ops do not load beside every torch build (a CPU wheel of torch with a PyPI torchvision fails
with "operator torchvision::nms does not exist"), so these are written with tensor ops only. Each follows the
arithmetic of the op it replaces (torchvision.ops.nms / roi_pool, detectron2's Box2BoxTransform), in float32 and in
the same order, so that the detector's outputs match the reference implementations to rounding.

Boxes are (n, 4) tensors of x1, y1, x2, y2 in pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# detectron2's clamp of the predicted log-scale: a 16 px box may grow to at most 1000 px
SCALE_CLAMP = math.log(1000.0 / 16)
NMS_BLOCK = 512


def pairwise_iou(a: torch.Tensor, b: torch.Tensor, plus_one: bool = False) -> torch.Tensor:
    """IoU of every box of `a` (n, 4) with every box of `b` (m, 4): (n, m). `plus_one`: Caffe's pixel-inclusive
    widths (x2 - x1 + 1), as the original bottom-up-attention NMS measures them."""
    one = 1.0 if plus_one else 0.0
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + one).clamp(min=0)  # (n, m, 2)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int | None = None) -> torch.Tensor:
    """Greedy NMS as torchvision.ops.nms: the indices of the kept boxes in decreasing score; a box is dropped when
    its IoU with a kept, higher-scoring box exceeds the threshold. `max_keep` stops once that many are kept (the
    result is then the first `max_keep` of the full one)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = boxes[order]
    suppressed = np.zeros(len(order), dtype=bool)
    kept: list[int] = []
    for start in range(0, len(order), NMS_BLOCK):  # IoU rows a block at a time: a stop at max_keep skips the rest
        over = (pairwise_iou(ranked[start : start + NMS_BLOCK], ranked) > iou_threshold).cpu().numpy()
        for i in range(start, min(start + NMS_BLOCK, len(order))):  # the greedy pass is sequential
            if suppressed[i]:
                continue
            kept.append(i)
            if max_keep is not None and len(kept) == max_keep:
                return order[torch.as_tensor(kept, dtype=torch.long, device=boxes.device)]
            suppressed |= over[i - start]
    return order[torch.as_tensor(kept, dtype=torch.long, device=boxes.device)]


def nms_per_class(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, plus_one: bool) -> torch.Tensor:
    """NMS run separately for every class over the SAME boxes (the original bottom-up-attention's loop over 1,600
    classes, vectorised over classes): boxes (r, 4), scores (r, c) -> kept (r, c) bool."""
    r, c = scores.shape
    over = pairwise_iou(boxes, boxes, plus_one) > iou_threshold  # (r, r), shared by all classes
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices  # (r, c): rank -> box, per class
    cols = torch.arange(c, device=scores.device)
    suppressed = torch.zeros(c, r, dtype=torch.bool, device=scores.device)
    kept = torch.zeros(c, r, dtype=torch.bool, device=scores.device)
    for rank in range(r):  # one greedy step for all classes at once
        box = order[rank]  # (c,)
        alive = ~suppressed[cols, box]
        kept[cols, box] = alive
        suppressed |= over[box] & alive[:, None]
    return kept.T


def clip_boxes_(boxes: torch.Tensor, height, width) -> torch.Tensor:
    """Clamp boxes (..., 4) into [0, width] x [0, height] in place."""
    if not torch.isfinite(boxes).all():
        raise FloatingPointError("the detector produced a non-finite box (NaN or infinity in its weights or input?)")
    boxes[..., 0::2] = boxes[..., 0::2].clamp(min=0, max=width)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(min=0, max=height)
    return boxes


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights) -> torch.Tensor:
    """R-CNN box decoding: deltas (n, 4k) of (dx, dy, dw, dh) move boxes (n, 4) -> (n, 4k); centre shifts scale
    with the box size, size changes are exponential (clamped at SCALE_CLAMP)."""
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=SCALE_CLAMP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.empty_like(deltas)
    out[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    out[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    out[:, 2::4] = pred_ctr_x + 0.5 * pred_w
    out[:, 3::4] = pred_ctr_y + 0.5 * pred_h
    return out


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # C's round(): halves go away from zero (torch.round rounds them to even)
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _bins(start: torch.Tensor, end: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caffe RoIPool's bins along one axis for k RoIs, relative to each RoI's first cell: (lo, hi) of shape
    (k, bins), computed in float32 as the C++ kernel does, and each RoI's length in cells."""
    length = torch.clamp(end - start + 1, min=1)
    bin_size = length.to(torch.float32) / bins
    steps = torch.arange(bins, dtype=torch.float32, device=start.device)
    lo = torch.floor(steps[None] * bin_size[:, None]).long()
    hi = torch.ceil((steps[None] + 1) * bin_size[:, None]).long()
    return lo, hi, length


def _pool_one(crop: torch.Tensor, lo_h, hi_h, lo_w, hi_w, size: int) -> torch.Tensor:
    """Max of every bin of one RoI's crop (C, h + 1, w + 1) given its bins' cell ranges; an empty bin is 0."""
    h, w = crop.shape[1] - 1, crop.shape[2] - 1
    a_lo_h, a_hi_h = _adaptive(size, h, crop.device)
    a_lo_w, a_hi_w = _adaptive(size, w, crop.device)
    same = torch.equal(lo_h, a_lo_h) and torch.equal(hi_h, a_hi_h) and torch.equal(lo_w, a_lo_w)
    if same and torch.equal(hi_w, a_hi_w):
        return F.adaptive_max_pool2d(crop[:, :h, :w], size)
    neg_inf = crop.new_tensor(float("-inf"))
    cols = torch.arange(crop.shape[2], device=crop.device)
    rows = torch.arange(crop.shape[1], device=crop.device)
    col_in = (cols[None] >= lo_w[:, None]) & (cols[None] < hi_w[:, None])  # (S, w)
    row_in = (rows[None] >= lo_h[:, None]) & (rows[None] < hi_h[:, None])  # (S, h)
    by_col = torch.where(col_in[None, None], crop[:, :, None, :], neg_inf).amax(-1)  # (C, h, S)
    out = torch.where(row_in[None, :, :, None], by_col[:, None], neg_inf).amax(2)  # (C, S, S)
    return torch.where(torch.isneginf(out), torch.zeros_like(out), out)


def _adaptive(bins: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The bins adaptive_max_pool2d uses over `length` cells (exact integer arithmetic)."""
    i = torch.arange(bins, device=device)
    return (i * length) // bins, ((i + 1) * length + bins - 1) // bins


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float) -> torch.Tensor:
    """Caffe's RoIPool (torchvision.ops.roi_pool) over NON-NEGATIVE features (post-ReLU, as the detector's res4):
    the max over each of output_size^2 bins of every RoI; a bin that holds no cell is 0.

    features (n, C, H, W); rois (k, 5) of (image index, x1, y1, x2, y2) in input pixels -> (k, C, S, S). RoI ends
    are rounded to cells and included, as in the original. Each RoI's cells are cut out (zero-padded where the
    RoI passes the map's border: zeros never win a max over non-negative cells, and empty bins must be 0) and
    pooled by adaptive_max_pool2d, whose bins are the same unless float32 rounding moves an edge (then a masked
    max computes the Caffe bins exactly).
    """
    k, (_, channels, height, width) = len(rois), features.shape
    out = features.new_zeros(k, channels, output_size, output_size)
    cells = _round_half_away(rois[:, 1:] * torch.tensor(spatial_scale, dtype=torch.float32)).long()  # (k, 4)
    lo_h, hi_h, len_h = _bins(cells[:, 1], cells[:, 3], output_size)
    lo_w, hi_w, len_w = _bins(cells[:, 0], cells[:, 2], output_size)
    for i, (x0, y0, h, w) in enumerate(torch.stack([cells[:, 0], cells[:, 1], len_h, len_w], 1).tolist()):
        # one extra row and column: float32 rounding can end the last bin one cell past the RoI (length 57 / 14)
        crop = features.new_zeros(channels, h + 1, w + 1)
        src = features[int(rois[i, 0]), :, max(y0, 0) : min(y0 + h + 1, height), max(x0, 0) : min(x0 + w + 1, width)]
        if src.numel():
            crop[:, max(-y0, 0) : max(-y0, 0) + src.shape[1], max(-x0, 0) : max(-x0, 0) + src.shape[2]] = src
        out[i] = _pool_one(crop, lo_h[i], hi_h[i], lo_w[i], hi_w[i], output_size)
    return out
