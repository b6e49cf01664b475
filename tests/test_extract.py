"""Feature extraction from images (lxmert_fast.detector, python -m lxmert_fast.extract) with a tiny random detector:
the TSV it writes is read back by the project's loaders, batches give each image's own result, a killed run resumes
without losing or repeating an image, weight files cannot execute code, bad images are refused by name."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from lxmert_fast.cli import run
from lxmert_fast.data.feature_store import FeatureStore  # noqa: E402
from lxmert_fast.data.formats import iter_feature_tsv  # noqa: E402
from lxmert_fast.detector import (  # noqa: E402
    DetectorConfig,
    FasterRCNN,
    FeatureExtractor,
    ImageError,
    Selection,
    WeightsError,
    extract_to_tsv,
    list_images,
    load_detector,
)
from lxmert_fast.detector.boxes import nms, roi_pool  # noqa: E402
from lxmert_fast.detector.preprocess import read_image  # noqa: E402
from lxmert_fast.extract import main as extract_main  # noqa: E402

TINY = DetectorConfig(
    depth_blocks=(1, 1, 1), stem_channels=8, res2_channels=16, bottleneck_width=4, rpn_hidden=8, num_classes=20,
    num_attrs=7, min_size=96, max_size=160, rpn_pre_nms_topk=400, rpn_post_nms_topk=60, anchor_sizes=(8, 16, 32, 64),
    rpn_nms=0.9,
)  # fmt: skip
SIZES = [(100, 150), (130, 90), (64, 64), (90, 121)]  # (h, w): batches need padding


def tiny_detector(seed=0):
    torch.manual_seed(seed)
    model = FasterRCNN(TINY)
    for p in model.parameters():  # large random weights: varied scores, so selection and NMS have work to do
        torch.nn.init.normal_(p, std=0.3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_weights(folder, model):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "detector_config.json").write_text(json.dumps(dataclasses.asdict(model.cfg)))
    return folder / "pytorch_model.bin"


@pytest.fixture(scope="module")
def detector():
    return tiny_detector()


@pytest.fixture
def images(tmp_path):
    """Colour JPEG and PNG, grayscale, RGBA, and a JPEG stored sideways with an EXIF rotation."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    modes = [("a.jpg", "RGB"), ("b.png", "RGB"), ("c_gray.png", "L"), ("d_rgba.png", "RGBA")]
    for (name, mode), (h, w) in zip(modes, SIZES, strict=True):
        pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        Image.fromarray(pixels, "RGBA").convert(mode).save(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees clockwise
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(folder / "e_exif.jpg", exif=exif)
    return folder


def run_cli(*args):
    """The command as a user runs it: its exit status (errors on stderr)."""
    with pytest.raises(SystemExit) as exc:
        run(extract_main, [str(a) for a in args])
    return exc.value.code


def test_cli_writes_a_tsv_the_loaders_read(tmp_path, images, detector, capsys):
    weights = save_weights(tmp_path / "weights", detector)
    out = tmp_path / "feats.tsv"
    counts = extract_main([str(images), "--out", str(out), "--weights", str(weights), "--workers", "1",
                           "--batch-size", "2", "--min-size", "96", "--max-size", "160", "--no-progress"])  # fmt: skip
    assert counts == {"done_before": 0, "written": 5, "skipped": 0}
    rows = {r.img_id: r for _, _, r in iter_feature_tsv(out)}
    assert sorted(rows) == ["a", "b", "c_gray", "d_rgba", "e_exif"]
    for img_id, (h, w) in zip(["a", "b", "c_gray", "d_rgba"], SIZES, strict=True):
        assert (rows[img_id].img_h, rows[img_id].img_w) == (h, w)
    assert (rows["e_exif"].img_h, rows["e_exif"].img_w) == (70, 40)  # upright
    for r in rows.values():
        assert r.num_boxes == 36 and r.features.shape == (36, TINY.feature_dim)
        assert r.objects_id.max() < TINY.num_classes and r.attrs_id.max() < TINY.num_attrs
        assert (r.objects_conf > 0).all() and (r.objects_conf <= 1).all()
    store = FeatureStore.from_tsv(out, store_dir=tmp_path / "store")
    assert len(store) == 5 and "d_rgba" in store


def test_batched_equals_one_at_a_time(images, detector):
    extractor = FeatureExtractor(detector, Selection(min_boxes=10, max_boxes=30), device="cpu")
    paths = list_images(images)
    alone = [extractor.extract_features([p])[0] for p in paths]
    batched = extractor.extract_features(paths, batch_size=len(paths))
    for a, b in zip(alone, batched, strict=True):
        assert a["img_id"] == b["img_id"] and a["num_boxes"] == b["num_boxes"]
        np.testing.assert_array_equal(a["objects_id"], b["objects_id"])
        np.testing.assert_array_equal(a["attrs_id"], b["attrs_id"])
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a["boxes"], b["boxes"], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(a["objects_conf"], b["objects_conf"], rtol=1e-5, atol=1e-6)


def test_padding_would_change_features_without_the_mask(detector):
    """The batch test above can fail: without the per-image masks, padding changes the backbone's output."""
    img = torch.randn(1, 3, 96, 130)
    padded = torch.nn.functional.pad(img, (0, 40, 0, 30))
    alone = detector.backbone(img)[0]
    masked, _ = detector.backbone(padded, torch.tensor([[96, 130]]))
    unmasked, _ = detector.backbone(padded)
    h, w = alone.shape[-2:]
    torch.testing.assert_close(masked[..., :h, :w], alone, rtol=1e-5, atol=1e-5)
    assert (unmasked[..., :h, :w] - alone).abs().max() > 1e-3


class Killed(Exception):
    pass


def test_killed_extraction_resumes_without_loss_or_repeat(tmp_path, images, detector, monkeypatch):
    extractor = FeatureExtractor(detector, device="cpu")
    paths = list_images(images)
    clean = tmp_path / "clean.tsv"
    extract_to_tsv(paths, clean, extractor, batch_size=2, progress=False)
    out = tmp_path / "resumed.tsv"
    real_detect, calls = extractor.detect, []

    def dying_detect(*args):
        if len(calls) == 1:
            raise Killed  # killed while detecting the second batch
        calls.append(1)
        return real_detect(*args)

    monkeypatch.setattr(extractor, "detect", dying_detect)
    with pytest.raises(Killed):
        extract_to_tsv(paths, out, extractor, batch_size=2, progress=False)
    monkeypatch.setattr(extractor, "detect", real_detect)
    assert len(out.read_text().splitlines()) == 2
    with open(out, "a") as f:  # a row torn by a kill during the write
        f.write(clean.read_text().splitlines()[2][:1000])
    counts = extract_to_tsv(paths, out, extractor, batch_size=2, progress=False)
    assert counts == {"done_before": 2, "written": 3, "skipped": 0}
    got = [r for _, _, r in iter_feature_tsv(out)]
    want = {r.img_id: r for _, _, r in iter_feature_tsv(clean)}
    assert sorted(r.img_id for r in got) == sorted(want)  # each image once
    for r in got:
        np.testing.assert_allclose(r.features, want[r.img_id].features, rtol=1e-5, atol=1e-5)
    assert extract_to_tsv(paths, out, extractor, progress=False)["written"] == 0  # complete: nothing to do


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["model_final.pkl", "pytorch_model.bin"])
def test_malicious_weights_execute_nothing(tmp_path, name, images):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.stem.conv1.weight": Exploit(marker)}}, f)
    with pytest.raises(WeightsError, match=str(path)):
        load_detector(path)
    assert run_cli(images, "--out", tmp_path / "x.tsv", "--weights", path, "--no-progress") == 2
    assert not marker.exists()


def test_detectron2_pickle_of_arrays_loads(tmp_path, detector):
    state = {k: v.numpy() for k, v in detector.state_dict().items() if "num_batches" not in k}
    with open(tmp_path / "model_final.pkl", "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    loaded = load_detector(tmp_path / "model_final.pkl", TINY)
    for key, value in detector.state_dict().items():
        if "num_batches" not in key:
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_bad_images_are_named(tmp_path, detector):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "text.jpg").write_text("not an image")
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(folder / "trunc.jpg")
    (folder / "trunc.jpg").write_bytes((folder / "trunc.jpg").read_bytes()[:200])
    Image.fromarray(np.zeros((2, 400, 3), np.uint8)).save(folder / "thin.png")
    Image.fromarray(np.zeros((30, 30), np.uint16)).save(folder / "deep.png")
    extractor = FeatureExtractor(detector, device="cpu")
    for name in ("text.jpg", "trunc.jpg", "thin.png", "deep.png"):
        with pytest.raises(ImageError, match=str(folder / name)):
            extractor.extract_features([folder / name])
    Image.fromarray(np.full((70, 90, 3), 128, np.uint8)).save(folder / "good.png")
    weights = save_weights(tmp_path / "w", detector)
    args = [folder, "--out", tmp_path / "o.tsv", "--weights", weights, "--no-progress", "--workers", "0"]
    assert run_cli(*args) == 2
    counts = extract_main([str(a) for a in args] + ["--skip-bad", "--min-size", "96", "--max-size", "160"])
    assert counts["skipped"] == 4 and counts["written"] == 1
    assert run_cli(tmp_path / "missing", "--out", tmp_path / "o.tsv") == 2


def test_exif_orientation_and_modes(images):
    assert read_image(images / "e_exif.jpg").shape == (70, 40, 3)
    gray = read_image(images / "c_gray.png")
    assert gray.shape == (64, 64, 3) and (gray[..., 0] == gray[..., 2]).all()


def test_weights_from_the_hub_cache(tmp_path, detector):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--unc-nlp--frcnn-vg-finetuned"
    save_weights(repo / "snapshots" / commit, detector)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.save(detector.state_dict(), tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import torch
        from lxmert_fast.detector import load_detector
        got = load_detector("unc-nlp/frcnn-vg-finetuned").state_dict()
        want = torch.load({str(tmp_path / "want.pt")!r}, weights_only=True)
        assert all(torch.equal(got[k], want[k]) for k in want if "num_batches" not in k)
        print("loaded")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["loaded"]


def test_nms_and_roi_pool_semantics():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    feats = torch.arange(2 * 1 * 6 * 8, dtype=torch.float32).reshape(2, 1, 6, 8)
    rois = torch.tensor([[1, 0, 0, 7, 5], [0, 2, 1, 3.4, 2.6], [0, 30, 30, 40, 40.0]])
    out = roi_pool(feats, rois, 2, 1.0)
    assert out[0, 0].tolist() == [[67, 71], [91, 95]]  # image 1: 48 + row * 8 + col, bins of 3 x 4 cells
    assert out[1, 0].tolist() == [[18, 19], [26, 27]]  # rows 1-3 in two bins of 1.5: row 2 is in both
    assert out[2].abs().sum() == 0  # outside the map: empty bins are 0
