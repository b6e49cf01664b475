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

# detectron2's clamp of the predicted log-scale: a 16 px box may grow to at most 1000 px
SCALE_CLAMP = math.log(1000.0 / 16)


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
    over = (pairwise_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()  # (n, n) in score order
    suppressed = np.zeros(len(order), dtype=bool)
    kept = []
    for i in range(len(order)):  # the greedy pass is sequential; numpy rows keep each step at a few microseconds
        if suppressed[i]:
            continue
        kept.append(i)
        if max_keep is not None and len(kept) == max_keep:
            break
        suppressed |= over[i]
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


def _bin_masks(start: torch.Tensor, end: torch.Tensor, bins: int, size: int) -> torch.Tensor:
    """Caffe RoIPool's bins along one axis for k RoIs: (k, bins, size) bool, True where a cell lies in a bin."""
    length = torch.clamp(end - start + 1, min=1).to(torch.float32)
    bin_size = length / bins  # float32, as the C++ kernel computes it
    steps = torch.arange(bins, dtype=torch.float32, device=start.device)
    lo = torch.floor(steps[None] * bin_size[:, None]).long() + start[:, None]
    hi = torch.ceil((steps[None] + 1) * bin_size[:, None]).long() + start[:, None]
    lo, hi = lo.clamp(0, size), hi.clamp(0, size)
    cells = torch.arange(size, device=start.device)
    return (cells[None, None] >= lo[..., None]) & (cells[None, None] < hi[..., None])


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float) -> torch.Tensor:
    """Caffe's RoIPool (torchvision.ops.roi_pool): max over each of output_size^2 bins of every RoI.

    features (n, C, H, W); rois (k, 5) of (image index, x1, y1, x2, y2) in input pixels -> (k, C, S, S). A bin
    that holds no cell is 0. RoI ends are rounded to cells and included, as in the original.
    """
    k, (_, channels, height, width) = len(rois), features.shape
    out = features.new_zeros(k, channels, output_size, output_size)
    if k == 0:
        return out
    cells = _round_half_away(rois[:, 1:] * torch.tensor(spatial_scale, dtype=torch.float32)).long()  # (k, 4)
    rows = _bin_masks(cells[:, 1], cells[:, 3], output_size, height)  # (k, S, H)
    cols = _bin_masks(cells[:, 0], cells[:, 2], output_size, width)  # (k, S, W)
    neg_inf = torch.tensor(float("-inf"), dtype=features.dtype, device=features.device)
    for i in range(k):  # crop each RoI's cells so that the masked max only touches them
        r = rows[i].any(0).nonzero()
        c = cols[i].any(0).nonzero()
        if len(r) == 0 or len(c) == 0:
            continue
        r0, r1, c0, c1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
        crop = features[int(rois[i, 0]), :, r0:r1, c0:c1]  # (C, h, w)
        by_col = torch.where(cols[i, None, None, :, c0:c1], crop[:, :, None, :], neg_inf).amax(-1)  # (C, h, S)
        by_row = torch.where(rows[i, None, :, r0:r1, None], by_col[:, None], neg_inf).amax(2)  # (C, S, S)
        out[i] = torch.where(torch.isinf(by_row) & (by_row < 0), torch.zeros_like(by_row), by_row)
    return out
