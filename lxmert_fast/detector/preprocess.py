"""Images in, the detector's input out: decode (Pillow), orient, convert to BGR, resize, normalise, pad.

As the original bottom-up-attention test code: BGR pixels 0..255 (the Caffe ResNet's order; feeding RGB is
transformers #8333), the shorter side scaled to `min_size` unless the longer would then pass `max_size`, bilinear
resizing of the float image (torch.nn.functional.interpolate, as transformers' research FRCNN when given a tensor),
the VG pixel mean subtracted. Orientation: the EXIF tag is applied (a phone photo is seen upright). Grayscale,
palette, CMYK and RGBA images become BGR (alpha dropped, as cv2.imread does). What cannot be used (not an image,
truncated, 16-bit or float pixels, too large, too thin to survive stride 16) raises ImageError naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lxmert_fast.errors import ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_PIXELS = 100_000_000  # larger images are refused, not decoded (a decompression bomb costs no memory then)
MIN_RESIZED_SIDE = 32  # after resizing; below this the res4 map has too few cells for a proposal


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (h, w) the detector sees: shorter side `min_size`, longer side at most `max_size`."""
    scale = min_size / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def read_image(path) -> np.ndarray:
    """Decode an image file to an upright (h, w, 3) uint8 BGR array, or raise ImageError naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{path}: {img.width}x{img.height} pixels, more than the {MAX_PIXELS:,} allowed")
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ImageError(f"{path}: {img.mode!r} pixels (16-bit or float) are not supported; save it as 8-bit")
            img = ImageOps.exif_transpose(img)
            rgb = np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot decode the image ({err})") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


def prepare(bgr, min_size: int, max_size: int, pixel_mean, name="image") -> torch.Tensor:
    """(h, w, 3) BGR pixels (uint8 array or float tensor) -> the resized, normalised (3, h', w') float32 tensor."""
    img = torch.as_tensor(np.asarray(bgr) if not torch.is_tensor(bgr) else bgr).float()
    if img.ndim != 3 or img.shape[2] != 3:
        raise ImageError(f"{name}: expected an (h, w, 3) BGR image, got shape {tuple(img.shape)}")
    h, w = img.shape[:2]
    new_h, new_w = resized_size(h, w, min_size, max_size)
    if min(new_h, new_w) < MIN_RESIZED_SIDE:
        raise ImageError(
            f"{name}: {w}x{h} pixels is too thin (the short side would be {min(new_h, new_w)} px after resizing, "
            f"fewer than {MIN_RESIZED_SIDE})"
        )
    img = F.interpolate(img.permute(2, 0, 1)[None], (new_h, new_w), mode="bilinear", align_corners=False)[0]
    return img - torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (3, h_i, w_i) images into (n, 3, H, W), zeros at the bottom / right; and their sizes (n, 2)."""
    sizes = torch.tensor([img.shape[1:] for img in images], dtype=torch.long)
    height, width = sizes.max(0).values.tolist()
    batch = images[0].new_zeros(len(images), 3, height, width)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]] = img
    return batch, sizes


def list_images(source) -> list[Path]:
    """The image files of a folder (recursively, sorted), or those named one per line in a list file."""
    source = Path(source)
    if source.is_dir():
        found = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ImageError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return found
    if not source.is_file():
        raise ImageError(f"{source}: no such folder or list file")
    base = source.parent
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    return [Path(line) if os.path.isabs(line) else base / line for line in lines if line and not line.startswith("#")]
