"""Memory-mapped float16 feature store, converted once from a released object-feature TSV.

The original loads every TSV into RAM as float32, one copy per data-loader worker (75 GiB for pre-training, 207 GB
reported with 4 workers). Here each TSV is converted once, streaming row by row, into flat binary arrays that
readers map with np.memmap: half the bytes (fp16 features), nothing resident until touched, and one copy of each
page in the page cache however many workers read it.

Layout of a store directory (default: `<tsv>.store` next to the TSV):
    meta.json      format version, N, max_boxes, F, array dtypes/shapes, the source TSV's path, size and mtime, and
                   the largest object / attribute label id with its TSV line and img_id (checked against a model)
    img_ids.json   the img_id of each row, in TSV order
    features.bin   (N, max_boxes, F) float16        boxes.bin     (N, max_boxes, 4) float32, normalised to [0, 1]
    obj_ids.bin    (N, max_boxes) int64             obj_conf.bin  (N, max_boxes) float32
    attr_ids.bin   (N, max_boxes) int64             attr_conf.bin (N, max_boxes) float32
    num_boxes.bin  (N,) int32                       img_hw.bin    (N, 2) int32 (img_h, img_w)
Images with fewer than max_boxes (36) boxes are zero-padded; `num_boxes` says how many rows are real.

Conversion is atomic (see fsutil): it writes into a temporary sibling and renames it into place only when every
row has been validated and every file fsync'ed, so an interrupted or failed conversion leaves nothing that a reader
trusts. A store is re-used while its recorded TSV size and mtime match the TSV.

Public API
    convert_tsv(tsv_path, store_dir=None, *, max_boxes=36, feat_dim=None, box_tolerance=1e-5, progress=True)
        -> Path                         convert (or re-use) and return the store directory
    FeatureStore(store_dir)             open a converted store (lazily memory-mapped; pickles without its maps)
    FeatureStore.from_tsv(tsv_path, store_dir=None, **convert_kwargs) -> FeatureStore
    FeatureStore.gather(name, rows, out, at)   out[at] = the array's rows, in one read
    StoreError(RuntimeError)            a store directory that is missing, incomplete or inconsistent
    index_images(stores) -> {img_id: (store index, row)}   over several stores; an img_id held by two stores with
                                        different contents is an error naming both files
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lxmert_fast.errors import StoreError

from .formats import FeatureFormatError, ImageFeatures, iter_feature_tsv
from .fsutil import build_lock, publish_dir, remove_stale_staging, staging_dir

FORMAT = "lxmert_fast.feature_store"
VERSION = 2  # 2: boxes ordered, confidences >= 0, largest label ids recorded


def _array_specs(n: int, max_boxes: int, feat_dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        "features": ("<f2", (n, max_boxes, feat_dim)),
        "boxes": ("<f4", (n, max_boxes, 4)),
        "obj_ids": ("<i8", (n, max_boxes)),
        "obj_conf": ("<f4", (n, max_boxes)),
        "attr_ids": ("<i8", (n, max_boxes)),
        "attr_conf": ("<f4", (n, max_boxes)),
        "num_boxes": ("<i4", (n,)),
        "img_hw": ("<i4", (n, 2)),
    }


def default_store_dir(tsv_path) -> Path:
    tsv_path = Path(tsv_path)
    return tsv_path.with_name(tsv_path.name + ".store")


def _source_signature(tsv_path: Path) -> dict:
    st = tsv_path.stat()
    return {"path": str(tsv_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_meta(store_dir: Path) -> dict:
    """meta.json of a complete store, after checking every array file has the size it promises."""
    meta_path = store_dir / "meta.json"
    if not meta_path.is_file():
        raise StoreError(f"{store_dir}: not a feature store (no meta.json); convert the TSV with convert_tsv()")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StoreError(f"{store_dir}: store format {meta.get('format')!r} v{meta.get('version')} is not v{VERSION}")
    for name, spec in meta["arrays"].items():
        expected = np.dtype(spec["dtype"]).itemsize * int(np.prod(spec["shape"]))
        path = store_dir / f"{name}.bin"
        if not path.is_file() or path.stat().st_size != expected:
            raise StoreError(f"{store_dir}: {path.name} is missing or not {expected} bytes; reconvert the TSV")
    return meta


def _matches(store_dir: Path, tsv_path: Path, max_boxes: int, feat_dim: int | None) -> bool:
    try:
        meta = _read_meta(store_dir)
    except (StoreError, OSError, ValueError, KeyError):
        return False
    src = _source_signature(tsv_path)
    return (
        meta["source"]["size"] == src["size"]
        and meta["source"]["mtime_ns"] == src["mtime_ns"]
        and meta["max_boxes"] == max_boxes
        and (feat_dim is None or meta["feat_dim"] == feat_dim)
    )


def convert_tsv(
    tsv_path,
    store_dir=None,
    *,
    max_boxes: int = 36,
    feat_dim: int | None = None,
    box_tolerance: float = 1e-5,
    progress: bool = True,
) -> Path:
    """Convert a feature TSV into a store (or re-use a matching one) and return the store directory.

    Streams the TSV in constant memory (apart from the img_id list). Every row is validated (column count,
    base64, array sizes, finite values, non-negative confidences, boxes inside the image within `box_tolerance`
    after normalisation with x1 <= x2 and y1 <= y2, num_boxes <= max_boxes, unique img_id); the first bad row
    raises FeatureFormatError naming the file, line and img_id, and leaves no store behind. Concurrent callers
    (several ranks) serialise on a lock file and all get the one store.
    """
    tsv_path = Path(tsv_path)
    store_dir = Path(store_dir) if store_dir is not None else default_store_dir(tsv_path)
    if not tsv_path.is_file():
        raise FileNotFoundError(f"feature TSV not found: {tsv_path}")
    with build_lock(store_dir):
        if _matches(store_dir, tsv_path, max_boxes, feat_dim):
            return store_dir
        remove_stale_staging(store_dir)
        source = _source_signature(tsv_path)
        with staging_dir(store_dir) as tmp:
            meta = _write_store(tsv_path, tmp, max_boxes, feat_dim, box_tolerance, progress)
            if _source_signature(tsv_path) != source:
                raise StoreError(f"{tsv_path} changed while it was being converted; run the conversion again")
            meta["source"] = source
            with open(tmp / "meta.json", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            publish_dir(tmp, store_dir)
    return store_dir


def _write_store(
    tsv_path: Path, out: Path, max_boxes: int, feat_dim: int | None, box_tolerance: float, progress: bool
) -> dict:
    """Stream the TSV into raw array files under `out`; returns the meta dict (without "source")."""
    names = list(_array_specs(0, 1, 1))
    files = {name: open(out / f"{name}.bin", "wb") for name in names}
    first_line: dict[str, int] = {}  # img_id -> TSV line, in row order
    max_label = {"object": None, "attribute": None}  # the largest id of each kind: {id, line, img_id}
    bar = tqdm(
        total=tsv_path.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=f"converting {tsv_path.name}",
        disable=not progress,
    )
    try:
        for line_no, nbytes, r in iter_feature_tsv(tsv_path, feat_dim, box_tolerance):
            feat_dim = r.features.shape[1]
            feats16 = _checked_features(tsv_path, line_no, r, first_line, max_boxes)
            _write_row(files, r, feats16, max_boxes, feat_dim)
            first_line[r.img_id] = line_no
            _track_max_label(max_label, r, line_no)
            bar.update(nbytes)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    if not first_line:
        raise FeatureFormatError(f"{tsv_path}: no image rows")
    with open(out / "img_ids.json", "w", encoding="utf-8") as f:
        json.dump(list(first_line), f)
    return _store_meta(len(first_line), max_boxes, feat_dim, max_label)


def _checked_features(
    tsv_path: Path, line_no: int, r: ImageFeatures, first_line: dict[str, int], max_boxes: int
) -> np.ndarray:
    """Reject a row the store cannot hold (repeated img_id, too many boxes, float16 overflow); returns its
    features as float16."""
    n = r.num_boxes
    if r.img_id in first_line:
        raise FeatureFormatError(
            f"{tsv_path}:{line_no} (img_id {r.img_id!r}): duplicate img_id, already on line {first_line[r.img_id]}"
        )
    if n > max_boxes:
        raise FeatureFormatError(
            f"{tsv_path}:{line_no} (img_id {r.img_id!r}): num_boxes={n} exceeds the store's max_boxes="
            f"{max_boxes} (pass a larger max_boxes)"
        )
    feats16 = r.features.astype(np.float16)
    if not np.isfinite(feats16).all():
        raise FeatureFormatError(
            f"{tsv_path}:{line_no} (img_id {r.img_id!r}): feature values overflow float16 "
            f"(max |x| = {float(np.abs(r.features).max()):.4g} > 65504)"
        )
    return feats16


def _write_row(files: dict, r: ImageFeatures, feats16: np.ndarray, max_boxes: int, feat_dim: int) -> None:
    """Append one image's arrays to the open .bin files, each padded with zeros to max_boxes rows."""
    n = r.num_boxes
    scale = np.array([r.img_w, r.img_h, r.img_w, r.img_h], dtype=np.float32)
    rows = {
        "features": feats16,
        "boxes": r.boxes / scale,
        "obj_ids": r.objects_id,
        "obj_conf": r.objects_conf,
        "attr_ids": r.attrs_id,
        "attr_conf": r.attrs_conf,
    }
    specs = _array_specs(1, max_boxes, feat_dim)
    for name, arr in rows.items():
        dtype, shape = specs[name]
        padded = np.zeros(shape[1:], dtype=dtype)  # pad to max_boxes rows with zeros
        padded[:n] = arr
        files[name].write(padded.tobytes())
    files["num_boxes"].write(np.array([n], dtype="<i4").tobytes())
    files["img_hw"].write(np.array([r.img_h, r.img_w], dtype="<i4").tobytes())


def _track_max_label(max_label: dict, r: ImageFeatures, line_no: int) -> None:
    """Remember the largest object and attribute id seen so far, with the line and img_id it came from."""
    for kind, ids in (("object", r.objects_id), ("attribute", r.attrs_id)):
        largest = int(ids.max())
        if max_label[kind] is None or largest > max_label[kind]["id"]:
            max_label[kind] = {"id": largest, "line": line_no, "img_id": r.img_id}


def _store_meta(num_images: int, max_boxes: int, feat_dim: int, max_label: dict) -> dict:
    """The meta dict of a finished store (without "source")."""
    specs = _array_specs(num_images, max_boxes, feat_dim)
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_images": num_images,
        "max_boxes": max_boxes,
        "feat_dim": feat_dim,
        "max_label": max_label,
        "arrays": {name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in specs.items()},
    }


class FeatureStore:
    """Read access to a converted store.

    Construction reads only meta.json and img_ids.json; the arrays are np.memmap'ed on first use in each process,
    and pickling drops the maps, so a store can be handed to forked or spawned data-loader workers, which then
    share the page cache. Array attributes (read-only memmaps):
        features (N, B, F) float16, boxes (N, B, 4) float32 in [0, 1], obj_ids / attr_ids (N, B) int64,
        obj_conf / attr_conf (N, B) float32, num_boxes (N,) int32, img_hw (N, 2) int32   (B = max_boxes)
    """

    def __init__(self, store_dir):
        self.store_dir = Path(store_dir)
        meta = _read_meta(self.store_dir)
        self.meta = meta
        self.feat_dim: int = meta["feat_dim"]
        self.max_boxes: int = meta["max_boxes"]
        with open(self.store_dir / "img_ids.json", encoding="utf-8") as f:
            self.img_ids: list[str] = json.load(f)
        if len(self.img_ids) != meta["num_images"]:
            raise StoreError(
                f"{self.store_dir}: img_ids.json lists {len(self.img_ids)} ids, meta says N={meta['num_images']}"
            )
        self._rows = {img_id: i for i, img_id in enumerate(self.img_ids)}
        self._maps: dict[str, np.memmap] | None = None

    @classmethod
    def from_tsv(cls, tsv_path, store_dir=None, **convert_kwargs) -> FeatureStore:
        """Convert `tsv_path` if needed (see convert_tsv) and open the store."""
        return cls(convert_tsv(tsv_path, store_dir, **convert_kwargs))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None  # a memmap would pickle as a full in-memory copy of the array
        return state

    def _open(self) -> dict[str, np.memmap]:
        if self._maps is None:
            self._maps = {
                name: np.memmap(
                    self.store_dir / f"{name}.bin", dtype=spec["dtype"], mode="r", shape=tuple(spec["shape"])
                )
                for name, spec in self.meta["arrays"].items()
            }
        return self._maps

    def __len__(self) -> int:
        return len(self.img_ids)

    def __contains__(self, img_id: str) -> bool:
        return img_id in self._rows

    @property
    def source_name(self) -> str:
        """The feature TSV the store was converted from (the store folder when that is not recorded)."""
        return self.meta.get("source", {}).get("path") or str(self.store_dir)

    def max_label(self, kind: str) -> dict | None:
        """The largest "object" or "attribute" label id of the store as {"id", "line", "img_id"} (line and img_id
        of the TSV row that holds it)."""
        return self.meta["max_label"][kind]

    def same_image(self, row: int, other: FeatureStore, other_row: int) -> bool:
        """Whether row `row` of this store and row `other_row` of `other` hold the same boxes, labels and
        features."""
        mine, theirs = self._open(), other._open()
        return mine.keys() == theirs.keys() and all(
            mine[name][row].shape == theirs[name][other_row].shape
            and np.array_equal(mine[name][row], theirs[name][other_row])
            for name in mine
        )

    def row(self, img_id: str) -> int:
        """Row index of an image; KeyError naming the store when it is absent."""
        try:
            return self._rows[img_id]
        except KeyError:
            raise KeyError(f"img_id {img_id!r} is not in the feature store {self.store_dir}") from None

    def gather(self, name: str, rows: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        """``out[at] = <array name>[rows]`` in one read (converted to out's dtype); when ``at`` covers all of
        ``out`` (sorted, unique) and the dtypes agree, straight into ``out``, without a temporary."""
        source = np.asarray(self._open()[name])  # the plain array: no memmap overhead per access
        if len(at) == len(out) and out.dtype == source.dtype:
            np.take(source, rows, axis=0, out=out, mode="clip")  # mode "raise" would buffer ``out``
        else:
            out[at] = source[rows]

    def __getattr__(self, name: str):
        # Array attributes (features, boxes, ...) resolve to the lazily opened memmaps.
        if name.startswith("_") or name not in self.__dict__.get("meta", {}).get("arrays", {}):
            raise AttributeError(name)
        return self._open()[name]

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.store_dir)!r}, N={len(self)}, max_boxes={self.max_boxes}, F={self.feat_dim})"


def index_images(stores) -> dict[str, tuple[int, int]]:
    """{img_id: (index of the store holding it, row)} over `stores`. An img_id in several stores must have the
    same contents in each (then the first is used); otherwise a FeatureFormatError names both files."""
    where: dict[str, tuple[int, int]] = {}
    for k, store in enumerate(stores):
        for row, img_id in enumerate(store.img_ids):
            first = where.setdefault(img_id, (k, row))
            if first != (k, row) and not stores[first[0]].same_image(first[1], store, row):
                raise FeatureFormatError(
                    f"img_id {img_id!r} is in two feature files with different boxes, labels or features: "
                    f"{stores[first[0]].source_name} and {store.source_name}; remove it from one of them"
                )
    return where


__all__ = ["FeatureStore", "StoreError", "convert_tsv", "default_store_dir", "index_images"]
