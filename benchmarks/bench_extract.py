"""Feature-extraction benchmark: images per second of lxmert_fast.detector (decode excluded, detection + box
selection timed) on 640 x 480 images, one at a time and in a padded batch of differently sized images.

    pytest benchmarks/bench_extract.py               smoke: a tiny random detector (checks the code path)
    pytest benchmarks/bench_extract.py --benchmark   the released detector's shape (ResNet-101 C4, 1,600 classes)
    python benchmarks/bench_extract.py [--full] [--images N] [--batch B]   the same, printed

Random weights: the cost of the released detector does not depend on its values (300 proposals are always
pooled and run through res5, which dominates). The research FRCNN is not timed here: it needs torchvision, which
does not load beside every torch build; see the report of issue 27 for the side-by-side numbers.
"""

import argparse
import time

import numpy as np
import pytest
import torch

SUITE = "extract"


def make_extractor(full: bool):
    from lxmert_fast.detector import DetectorConfig, FasterRCNN, FeatureExtractor

    cfg = DetectorConfig() if full else DetectorConfig(
        depth_blocks=(1, 1, 1), stem_channels=8, res2_channels=16, bottleneck_width=4, rpn_hidden=8, num_classes=20,
        num_attrs=7, min_size=96, max_size=160, rpn_pre_nms_topk=400, rpn_post_nms_topk=60,
        anchor_sizes=(8, 16, 32, 64), rpn_nms=0.9,
    )  # fmt: skip
    torch.manual_seed(0)
    return FeatureExtractor(FasterRCNN(cfg).eval())


def images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (640, 480), (427, 640), (480, 640)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def images_per_second(extractor, imgs, batch_size: int) -> float:
    extractor.extract_features(imgs[:1])  # warm-up
    t0 = time.perf_counter()
    records = extractor.extract_features(imgs, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    assert all(r["num_boxes"] == 36 for r in records)
    return len(imgs) / seconds


@pytest.mark.parametrize("batch_size", [1, 4])
def test_extract_images_per_second(bench, benchmark, batch_size):
    extractor = make_extractor(bench.full)
    imgs = images(4 if bench.full else 8)
    rate = images_per_second(extractor, imgs, batch_size)
    assert rate > 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    benchmark.extra_info.update({"suite": SUITE, "images_per_s": rate, "batch": batch_size, "device": device,
                                 "full": bench.full, "threads": torch.get_num_threads()})  # fmt: skip
    benchmark.pedantic(lambda: extractor.extract_features(imgs[:1]), rounds=1, iterations=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the released detector's shape (default: tiny)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    rate = images_per_second(make_extractor(args.full), images(args.images), args.batch)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(f"{rate:.3f} images/s ({'full' if args.full else 'tiny'} detector, batch {args.batch}, {where})")
