"""The bottom-up-attention Faster R-CNN (Anderson et al. 2018) as a PyTorch module: ResNet-101 C4 backbone, a
region proposal network on res4, RoIPool + res5 per region, and the Visual Genome heads (1,600 objects, 400
attributes). The regions' res5 outputs, averaged, are the 2,048-d features LXMERT reads.

Module and parameter names are those of the converted detector on the hub (unc-nlp/frcnn-vg-finetuned, the layout
of transformers' research project examples/research_projects/lxmert), so its state dict loads strictly.

Batches: images of different sizes are padded into one tensor, and the padding must not change anything (in the
research code it did: transformers #8769, GQA 59% -> 33%). So every feature map carries each image's valid size
and is zeroed outside it before any op that mixes neighbouring cells (3x3 convs, max pools), anchors are laid only
on an image's own cells, and RoIPool (a max over post-ReLU, hence non-negative, cells) only ever adds zeros. Each
image's result is then that of the image alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lxmert_fast.detector.boxes import apply_deltas, clip_boxes_, nms, roi_pool


@dataclass
class DetectorConfig:
    """The detector's shape and test-time settings; defaults are the released VG detector (and the original's
    600 / 1000 px test scale)."""

    depth_blocks: tuple = (3, 4, 23)  # res2, res3, res4 (ResNet-101); res5 has 3 blocks
    stem_channels: int = 64
    res2_channels: int = 256  # res5 has 8x: the feature size, 2048
    bottleneck_width: int = 64
    caffe_maxpool: bool = True  # the Caffe ResNet's stem pools without padding, rounding up
    rpn_hidden: int = 512
    anchor_sizes: tuple = (64, 128, 256, 512)
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms: float = 0.7
    rpn_min_size: float = 0.0
    num_classes: int = 1600
    num_attrs: int = 400
    pooler_resolution: int = 14
    box_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    pixel_mean: tuple = (102.9801, 115.9465, 122.7717)  # BGR, 0..255
    min_size: int = 600
    max_size: int = 1000

    @property
    def feature_dim(self) -> int:
        return self.res2_channels * 8


class ConvBN(nn.Conv2d):
    """A bias-free convolution followed by its (frozen, eval-mode) batch norm, stored as `.norm` like the hub."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__(cin, cout, kernel_size, stride, padding, dilation, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


def conv_out(sizes: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Each image's valid output size (n, 2) after `conv` from its valid input size (n, 2)."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (sizes + 2 * p - d * (k - 1) - 1) // s + 1


def mask_(x: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """Zero every image's cells outside its valid (h, w) in place; `sizes` None: nothing is padded."""
    if sizes is not None:
        for i, (h, w) in enumerate(sizes.tolist()):
            x[i, :, h:] = 0
            x[i, :, :, w:] = 0
    return x


class BottleneckBlock(nn.Module):
    def __init__(self, cin, cout, width, stride=1, dilation=1):
        super().__init__()
        # the MSRA/Caffe ResNet strides in the first 1x1 conv (stride_in_1x1)
        self.shortcut = ConvBN(cin, cout, 1, stride) if cin != cout else None
        self.conv1 = ConvBN(cin, width, 1, stride)
        self.conv2 = ConvBN(width, width, 3, 1, dilation, dilation)
        self.conv3 = ConvBN(width, cout, 1)

    def forward(self, x, sizes=None):
        out = F.relu_(self.conv1(x))
        if sizes is not None:
            sizes = conv_out(sizes, self.conv1)
        out = F.relu_(self.conv2(mask_(out, sizes)))  # 3x3: padding cells must be zeros, as the image's own border
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return mask_(F.relu_(out), sizes), sizes


class Stage(nn.Sequential):
    def __init__(self, blocks, cin, cout, width, first_stride, dilation=1):
        layers = [
            BottleneckBlock(cin if i == 0 else cout, cout, width, first_stride if i == 0 else 1, dilation)
            for i in range(blocks)
        ]
        super().__init__(*layers)

    def forward(self, x, sizes=None):
        for block in self:
            x, sizes = block(x, sizes)
        return x, sizes


class Stem(nn.Module):
    def __init__(self, channels, caffe_maxpool):
        super().__init__()
        self.conv1 = ConvBN(3, channels, 7, 2, 3)
        self.caffe_maxpool = caffe_maxpool

    def forward(self, x, sizes=None):
        x = F.relu_(self.conv1(x))
        if sizes is not None:
            sizes = conv_out(sizes, self.conv1)
        mask_(x, sizes)  # post-ReLU zeros never win a max, so the pool sees the image alone
        if self.caffe_maxpool:
            x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
            sizes = None if sizes is None else -((3 - sizes) // 2) + 1  # ceil((s - 3) / 2) + 1
        else:
            x = F.max_pool2d(x, 3, 2, 1)
            sizes = None if sizes is None else (sizes - 1) // 2 + 1
        return mask_(x, sizes), sizes


class Backbone(nn.Module):
    """Stem + res2..res4 (stride 16)."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.stem = Stem(cfg.stem_channels, cfg.caffe_maxpool)
        cin, cout, width = cfg.stem_channels, cfg.res2_channels, cfg.bottleneck_width
        for i, blocks in enumerate(cfg.depth_blocks):
            self.add_module(f"res{i + 2}", Stage(blocks, cin, cout, width, 1 if i == 0 else 2))
            cin, cout, width = cout, cout * 2, width * 2

    def forward(self, x, sizes=None):
        x, sizes = self.stem(x, sizes)
        for name in ("res2", "res3", "res4"):
            x, sizes = getattr(self, name)(x, sizes)
        return x, sizes


class RPNHead(nn.Module):
    def __init__(self, cin, hidden, num_anchors):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, 1, 1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)

    def forward(self, x):
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class RPN(nn.Module):
    """Proposals: anchors of every size and ratio on each res4 cell, moved by the predicted deltas, the
    highest-scoring `pre_nms_topk` kept, clipped, NMS'd, the best `post_nms_topk` returned (per image)."""

    def __init__(self, cfg: DetectorConfig, cin: int):
        super().__init__()
        self.cfg = cfg
        self.stride = 16
        cells = []
        for size in cfg.anchor_sizes:  # detectron2's cell anchors: centred on (0, 0), area size^2
            for ratio in cfg.anchor_ratios:
                w = (size**2.0 / ratio) ** 0.5
                h = ratio * w
                cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        self.register_buffer("cell_anchors", torch.tensor(cells, dtype=torch.float32), persistent=False)
        self.rpn_head = RPNHead(cin, cfg.rpn_hidden, len(cells))

    def anchors(self, height: int, width: int) -> torch.Tensor:
        """(height * width * A, 4) anchors in (row, column, anchor) order."""
        dev = self.cell_anchors.device
        xs = torch.arange(0, width * self.stride, self.stride, dtype=torch.float32, device=dev)
        ys = torch.arange(0, height * self.stride, self.stride, dtype=torch.float32, device=dev)
        shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([shift_x.reshape(-1), shift_y.reshape(-1)] * 2, dim=1)  # x, y, x, y
        return (shifts[:, None, :] + self.cell_anchors[None]).reshape(-1, 4)

    def forward(self, features, feat_sizes, image_sizes):
        logits, deltas = self.rpn_head(features)  # (n, A, H, W), (n, A*4, H, W)
        a, cfg = self.cell_anchors.shape[0], self.cfg
        out = []
        for i, ((fh, fw), (h, w)) in enumerate(zip(feat_sizes.tolist(), image_sizes.tolist(), strict=True)):
            score = logits[i, :, :fh, :fw].permute(1, 2, 0).reshape(-1)  # an image's own cells only
            delta = deltas[i, :, :fh, :fw].reshape(a, 4, fh, fw).permute(2, 3, 0, 1).reshape(-1, 4)
            boxes = apply_deltas(delta, self.anchors(fh, fw), (1.0, 1.0, 1.0, 1.0))
            score, order = score.sort(descending=True)
            top = order[: cfg.rpn_pre_nms_topk]
            boxes, score = clip_boxes_(boxes[top], h, w), score[: cfg.rpn_pre_nms_topk]
            wide = (boxes[:, 2] - boxes[:, 0] > cfg.rpn_min_size) & (boxes[:, 3] - boxes[:, 1] > cfg.rpn_min_size)
            boxes, score = boxes[wide], score[wide]
            keep = nms(boxes, score, cfg.rpn_nms, max_keep=cfg.rpn_post_nms_topk)
            out.append(boxes[keep])
        return out


class BoxPredictor(nn.Module):
    """Object scores (+ background, last), class-specific box deltas, and attribute scores (+ "no attribute",
    last) from the region feature and an embedding of its most likely class."""

    def __init__(self, dim, num_classes, num_attrs):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes + 1)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)
        self.cls_embedding = nn.Embedding(num_classes + 1, dim // 8)
        self.fc_attr = nn.Linear(dim + dim // 8, dim // 4)
        self.attr_score = nn.Linear(dim // 4, num_attrs + 1)

    def forward(self, x):
        scores = self.cls_score(x)
        emb = self.cls_embedding(scores.argmax(-1))
        attr = self.attr_score(F.relu(self.fc_attr(torch.cat([x, emb], -1))))
        return scores, attr, self.bbox_pred(x)


class Res5ROIHeads(nn.Module):
    """RoIPool (14 x 14 on res4) -> res5 at stride 1 with dilation 2 (the VG detector's change) -> mean -> heads."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.feature_dim
        self.res5 = Stage(3, dim // 2, dim, cfg.bottleneck_width * 8, 1, dilation=2)
        self.box_predictor = BoxPredictor(dim, cfg.num_classes, cfg.num_attrs)

    def forward(self, features, proposals):
        rois = torch.cat([torch.cat([p.new_full((len(p), 1), i), p], 1) for i, p in enumerate(proposals)])
        pooled = roi_pool(features, rois, self.cfg.pooler_resolution, 1.0 / 16)
        feats = self.res5(pooled)[0].mean(dim=[2, 3])  # (R, 2048)
        return (*self.box_predictor(feats), feats)


class FasterRCNN(nn.Module):
    """images (n, 3, H, W) normalised and padded at the bottom / right, sizes (n, 2) each image's (h, w) ->
    per image a dict of its proposals (R, 4), class probabilities (R, C + 1), attribute logits (R, A + 1), class
    boxes (R, 4C) and features (R, D), all in the resized image's pixels."""

    def __init__(self, cfg: DetectorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DetectorConfig()
        self.backbone = Backbone(cfg)
        self.proposal_generator = RPN(cfg, cfg.res2_channels * 4)
        self.roi_heads = Res5ROIHeads(cfg)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sizes: torch.Tensor) -> list[dict]:
        sizes = sizes.to(images.device)
        padded = bool((sizes != torch.tensor(images.shape[-2:], device=sizes.device)).any())
        features, feat_sizes = self.backbone(images, sizes if padded else None)
        if feat_sizes is None:
            feat_sizes = torch.tensor([features.shape[-2:]] * len(images))
        proposals = self.proposal_generator(features, feat_sizes, sizes)
        logits, attr_logits, deltas, feats = self.roi_heads(features, proposals)
        boxes = apply_deltas(deltas, torch.cat(proposals), self.cfg.box_reg_weights)
        counts = [len(p) for p in proposals]
        split = zip(
            proposals,
            logits.softmax(-1).split(counts),
            attr_logits.split(counts),
            boxes.split(counts),
            feats.split(counts),
            strict=True,
        )
        keys = ("proposals", "cls_probs", "attr_logits", "class_boxes", "features")
        return [dict(zip(keys, parts, strict=True)) for parts in split]
