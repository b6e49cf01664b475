"""Bottom-up-attention feature extraction: your own images -> the released 36 x 2048 region-feature TSVs.

Needs the `extract` extra (pip install -e ".[extract]": Pillow). Public API:
    DetectorConfig, FasterRCNN         the VG Faster R-CNN (ResNet-101 C4) and its settings (model.py)
    load_detector(source, cfg, device) weights from a hub id, the hub cache, a folder or a file, safely (weights.py)
    Selection                          which regions become rows: the original's rule ("butd") or the research
                                       FRCNN's ("hf"); 36 boxes, or min/max 10/100 (selection.py)
    FeatureExtractor                   .extract_features(images) -> list of per-image dicts of TSV fields
    extract_features(images, ...)      the same in one call, loading the detector
    extract_to_tsv(paths, out, ...)    resumable extraction into a TSV (extract.py)
    list_images(folder_or_list)        the image files to extract (preprocess.py)
"""

from lxmert_fast.detector.extract import FeatureExtractor, extract_to_tsv
from lxmert_fast.detector.model import DetectorConfig, FasterRCNN
from lxmert_fast.detector.preprocess import ImageError, list_images
from lxmert_fast.detector.selection import Selection
from lxmert_fast.detector.weights import HUB_ID, WeightsError, load_detector


def extract_features(images, weights=HUB_ID, cfg=None, selection=None, device=None, batch_size=4) -> list[dict]:
    """Per image (a path, a PIL image or an (h, w, 3) uint8 RGB array) a dict of the TSV fields (img_id, img_h,
    img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features), boxes in the image's
    pixels. `weights`: a hub id, folder or file, or an already loaded FasterRCNN."""
    model = weights if isinstance(weights, FasterRCNN) else load_detector(weights, cfg)
    return FeatureExtractor(model, selection, device).extract_features(images, batch_size=batch_size)


__all__ = [
    "HUB_ID",
    "DetectorConfig",
    "FasterRCNN",
    "FeatureExtractor",
    "ImageError",
    "Selection",
    "WeightsError",
    "extract_features",
    "extract_to_tsv",
    "list_images",
    "load_detector",
]
