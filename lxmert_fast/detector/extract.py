"""Images -> region features in the released TSV format: batched detection, a Python API, resumable TSV writing.

    extractor = FeatureExtractor(load_detector("unc-nlp/frcnn-vg-finetuned"))
    records = extractor.extract_features(["a.jpg", pil_image, rgb_array])   # per image a dict of TSV fields
    extract_to_tsv(list_images("photos/"), "photos.tsv", extractor)         # resumable, with a progress bar

A TSV being written is only ever appended to, one whole row per write and flushed (and fsynced) after every batch.
A killed run leaves complete rows plus at most one torn last row; the next run cuts the torn row off, skips every
img_id already in the file and appends the rest, so no image is lost or written twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lxmert_fast.data.formats import ImageFeatures, encode_tsv_row
from lxmert_fast.detector.model import FasterRCNN
from lxmert_fast.detector.preprocess import ImageError, pad_batch, prepare, read_image
from lxmert_fast.detector.selection import Selection, select_regions


class ImageDataset(torch.utils.data.Dataset):
    """(img_id, path) items -> (img_id, prepared image, raw (h, w), error message or None); decoding runs in the
    DataLoader's workers, and a bad image comes back as its error instead of killing the worker."""

    def __init__(self, items, min_size: int, max_size: int, pixel_mean):
        self.items, self.min_size, self.max_size, self.pixel_mean = list(items), min_size, max_size, pixel_mean

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img_id, path = self.items[i]
        try:
            bgr = read_image(path)
            image = prepare(bgr, self.min_size, self.max_size, self.pixel_mean, name=str(path))
            return img_id, image, bgr.shape[:2], None
        except ImageError as err:
            return img_id, None, None, str(err)


def _as_bgr(image, name: str) -> np.ndarray:
    """A path, a PIL image or an (h, w, 3) uint8 RGB array -> upright BGR uint8."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if hasattr(image, "convert"):  # a PIL image: orient and convert as a file would be
        from PIL import ImageOps

        return np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(image).convert("RGB"))[:, :, ::-1])
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageError(f"{name}: expected an (h, w, 3) uint8 RGB array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr[:, :, ::-1])


class FeatureExtractor:
    """A detector, its box selection and a device; `detect` turns prepared images into TSV records."""

    def __init__(self, model: FasterRCNN, selection: Selection | None = None, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.cfg = model.cfg
        self.selection = selection or Selection()

    def detect(self, img_ids, images: list[torch.Tensor], raw_sizes) -> list[dict]:
        """Prepared (3, h, w) images (padded into one batch here) -> per image a dict of the TSV fields."""
        batch, sizes = pad_batch(images)
        outs = self.model(batch.to(self.device), sizes)
        records = []
        for img_id, out, size, raw in zip(img_ids, outs, sizes.tolist(), raw_sizes, strict=True):
            try:
                records.append({"img_id": img_id, **select_regions(out, tuple(size), tuple(raw), self.selection)})
            except ValueError as err:
                raise ImageError(f"{img_id}: {err}") from None
        return records

    def extract_features(self, images, img_ids=None, batch_size: int = 4) -> list[dict]:
        """Paths, PIL images or (h, w, 3) uint8 RGB arrays -> per image a dict with the TSV fields (img_id, img_h,
        img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features) as numpy arrays.
        img_ids default to the file stems (paths) or the positions ("0", "1", ...)."""
        images = list(images)
        if img_ids is None:
            img_ids = [Path(im).stem if isinstance(im, (str, Path)) else str(i) for i, im in enumerate(images)]
        cfg, records = self.cfg, []
        for start in range(0, len(images), batch_size):
            chunk = range(start, min(start + batch_size, len(images)))
            names = [str(images[i]) if isinstance(images[i], (str, Path)) else f"image {i}" for i in chunk]
            bgrs = [_as_bgr(images[i], name) for i, name in zip(chunk, names, strict=True)]
            size = (cfg.min_size, cfg.max_size, cfg.pixel_mean)
            prepared = [prepare(b, *size, name) for b, name in zip(bgrs, names, strict=True)]
            records += self.detect([img_ids[i] for i in chunk], prepared, [b.shape[:2] for b in bgrs])
        return records


def to_image_features(record: dict) -> ImageFeatures:
    keys = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features")
    return ImageFeatures(*(record[k] for k in keys))


def resume_point(out: Path) -> set[str]:
    """The img_ids already complete in `out`; a torn last row (no newline: the run was killed while writing it)
    is cut off first."""
    if not out.exists():
        return set()
    with open(out, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
    return {line.split(b"\t", 1)[0].decode("ascii") for line in data[:end].splitlines() if line.strip()}


def image_ids(paths) -> list[tuple[str, Path]]:
    """(img_id, path) per image: the file stem, as the released files name COCO images; duplicates refused."""
    seen: dict[str, Path] = {}
    for path in map(Path, paths):
        if path.stem in seen:
            raise ImageError(f"{path}: img_id {path.stem!r} is also that of {seen[path.stem]}; rename one of them")
        if "\t" in path.stem or "\n" in path.stem:
            raise ImageError(f"{path}: a tab or newline in the file name cannot be an img_id")
        seen[path.stem] = path
    return list(seen.items())


def extract_to_tsv(
    paths,
    out,
    extractor: FeatureExtractor,
    batch_size: int = 4,
    num_workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Extract every image of `paths` not yet in `out` and append its row; returns counts
    {"done_before", "written", "skipped"}. A bad image raises ImageError, or with `skip_bad` is reported and
    left out (a later run tries it again)."""
    from tqdm import tqdm

    out = Path(out)
    items = image_ids(paths)
    done = resume_point(out)
    todo = [item for item in items if item[0] not in done]
    cfg = extractor.cfg
    data = ImageDataset(todo, cfg.min_size, cfg.max_size, cfg.pixel_mean)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    counts = {"done_before": len(items) - len(todo), "written": 0, "skipped": 0}
    bar = tqdm(total=len(items), initial=counts["done_before"], unit="img", disable=not progress, desc=out.name)
    with open(out, "a", encoding="ascii", newline="\n") as f:
        for batch in loader:
            good = [b for b in batch if b[3] is None]
            for _, _, _, err in (b for b in batch if b[3] is not None):
                if not skip_bad:
                    raise ImageError(err)
                counts["skipped"] += 1
                (tqdm.write if progress else log)(f"skipped: {err}")
            if good:
                records = extractor.detect([b[0] for b in good], [b[1] for b in good], [b[2] for b in good])
                for record in records:
                    f.write(encode_tsv_row(to_image_features(record)))  # one whole row per write
                f.flush()
                os.fsync(f.fileno())
                counts["written"] += len(records)
            bar.update(len(batch))
    bar.close()
    return counts
