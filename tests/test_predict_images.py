"""From your own picture to an answer: Predictor.add_images and `predict --image / --images`, with a small random
detector whose region features are as wide as a small random model expects (no download)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="the extract extra (Pillow) is not installed")
from PIL import Image  # noqa: E402

from lxmert_fast import LxmertConfig, LxmertForQuestionAnswering  # noqa: E402
from lxmert_fast.cli import run  # noqa: E402
from lxmert_fast.data.tokenizer import load_tokenizer  # noqa: E402
from lxmert_fast.detector import DetectorConfig, FasterRCNN, FeatureExtractor, extract_to_tsv  # noqa: E402
from lxmert_fast.errors import PredictionError  # noqa: E402
from lxmert_fast.model.folder import save_model_folder  # noqa: E402
from lxmert_fast.predict import main as predict_main  # noqa: E402
from lxmert_fast.use.predictor import Predictor  # noqa: E402

WORDS = ["what", "color", "is", "the", "cat", "dog", "red", "blue", "?"]
ANSWERS = ["red", "blue", "green"]
DETECTOR = DetectorConfig(
    depth_blocks=(1, 1, 1), stem_channels=8, res2_channels=4, bottleneck_width=4, rpn_hidden=8, num_classes=20,
    num_attrs=7, min_size=96, max_size=160, rpn_pre_nms_topk=400, rpn_post_nms_topk=60, anchor_sizes=(8, 16, 32, 64),
    rpn_nms=0.9,
)  # fmt: skip  (res2_channels 4: 32-d region features)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_images")
    (root / "tok").mkdir()
    (root / "tok" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    detector = FasterRCNN(DETECTOR).eval()
    for p in detector.parameters():  # large random weights: varied scores, boxes to keep
        torch.nn.init.normal_(p, std=0.3)
    (root / "detector").mkdir()
    torch.save(detector.state_dict(), root / "detector" / "pytorch_model.bin")
    (root / "detector" / "detector_config.json").write_text(json.dumps(dataclasses.asdict(DETECTOR)))
    config = LxmertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1, x_layers=1,
                          r_layers=1, visual_feat_dim=DETECTOR.feature_dim, vocab_size=20, num_qa_labels=3)
    model = LxmertForQuestionAnswering(config, backend="torch").eval()
    save_model_folder(model, root / "model", load_tokenizer(root / "tok"), labels=ANSWERS)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"cat": (100, 150), "dog": (130, 90)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return {"root": root, "model": model, "extractor": FeatureExtractor(detector), "tok": str(root / "tok")}


def test_add_images_answers_as_the_same_features_from_a_tsv(parts, tmp_path):
    root = parts["root"]
    ours = Predictor(parts["model"], parts["tok"], ANSWERS, device="cpu")
    assert ours.add_images([root / "cat.png", Image.open(root / "dog.png")], parts["extractor"]) == ["cat", "image1"]
    asked = ours.ask("what color is the cat?", "cat", top_k=3)
    assert asked["answer"] in ANSWERS and len(asked["top_k"]) == 3

    tsv = tmp_path / "feats.tsv"  # the same pictures through the extraction command's writer
    extract_to_tsv([root / "cat.png"], tsv, parts["extractor"], batch_size=1, progress=False)
    reference = Predictor(parts["model"], parts["tok"], ANSWERS, features=str(tsv), device="cpu")
    assert reference.ask("what color is the cat?", "cat", top_k=3) == asked


def test_add_images_refuses_a_taken_img_id_and_features_of_another_width(parts):
    root = parts["root"]
    predictor = Predictor(parts["model"], parts["tok"], ANSWERS, device="cpu")
    predictor.add_images([root / "cat.png"], parts["extractor"])
    with pytest.raises(PredictionError, match="img_id 'cat' is already taken"):
        predictor.add_images([root / "cat.png"], parts["extractor"])
    wide = FeatureExtractor(FasterRCNN(DetectorConfig(**{**DETECTOR.__dict__, "res2_channels": 8})).eval())
    with pytest.raises(PredictionError, match="the detector gives 64-d region features, .* expects 32"):
        predictor.add_images([root / "dog.png"], wide)


def test_predict_image_command(parts, capsys):
    root = parts["root"]
    args = ["--model", str(root / "model"), "--image", str(root / "cat.png"), "--question", "what color is the cat?",
            "--detector", str(root / "detector"), "--device", "cpu", "--top-k", "2"]
    result = predict_main(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed == result and printed["img_id"] == "cat" and printed["answer"] in ANSWERS

    with pytest.raises(SystemExit):  # as a user runs it: a flag error, exit 2
        run(predict_main, ["--model", str(root / "model"), "--image", str(root / "cat.png"), "--statement", "x"])
    assert "--image goes with --question" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(predict_main, ["--model", str(root / "model"), "--question", "what?", "--img-id", "cat"])
    assert "give --features (object-feature TSVs), or --image / --images" in capsys.readouterr().err
