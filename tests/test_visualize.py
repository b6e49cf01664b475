"""Attention maps: the recomputed cross-attention equals the model's (and transformers' module for the other
direction), and the command writes PNGs that are not blank, on the sample data."""

import sys

import numpy as np
import pytest
import torch
import transformers
from helpers import make_batch, model_inputs, small_config

from lxmert_fast import LxmertConfig, LxmertModel, visualize
from lxmert_fast.data import FeatureStore, ensure_sample_data
from lxmert_fast.data.pretrain_dataset import load_tokenizer
from lxmert_fast.errors import InputError, MissingDependencyError
from lxmert_fast.use import attention

pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return ensure_sample_data(tmp_path_factory.mktemp("viz") / "sample_data", num_images=6, feat_dim=32)


@pytest.fixture(scope="module")
def model_dir(sample, tmp_path_factory):
    tokenizer = load_tokenizer(sample.tokenizer_dir)
    config = LxmertConfig(
        vocab_size=len(tokenizer),
        visual_feat_dim=32,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        l_layers=2,
        r_layers=2,
        x_layers=2,
        num_qa_labels=5,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("viz") / "model"
    LxmertModel(config, backend="torch").save_pretrained(out)
    return out


def test_recomputed_cross_attention_is_the_models_and_transformers(sample):
    config = small_config("uneven")
    torch.manual_seed(0)
    model = LxmertModel(config, backend="torch").eval()
    hf = transformers.LxmertModel(config).eval()
    hf.load_state_dict(model.state_dict())
    batch = model_inputs(make_batch(config, targets=False))  # padding in both streams
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True, return_dict=True)
        to_vision, to_language = attention.cross_attentions_from_states(
            model, out, batch["attention_mask"], batch["visual_attention_mask"]
        )
        assert len(to_vision) == len(to_language) == config.x_layers
        for i, layer in enumerate(hf.encoder.x_layers):
            torch.testing.assert_close(to_vision[i], out.cross_encoder_attentions[i], atol=1e-6, rtol=1e-5)
            # the direction the model does not return, from transformers' own module on the same inputs
            lang = out.language_hidden_states[config.l_layers + i - 1]
            visn = out.vision_hidden_states[config.r_layers + i - 1]
            mask = (1.0 - batch["attention_mask"][:, None, None, :]) * torch.finfo(torch.float32).min
            _, probs = layer.visual_attention(visn, lang, ctx_att_mask=mask, output_attentions=True)
            torch.testing.assert_close(to_language[i], probs, atol=1e-6, rtol=1e-5)


def _png_stats(path):
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return pixels.shape, pixels.var()


def test_command_writes_every_map_and_the_boxes(sample, model_dir, tmp_path, capsys):
    from PIL import Image

    store = FeatureStore.from_tsv(sample.features_tsv, progress=False)
    img_id = store.img_ids[0]
    img_h, img_w = (int(v) for v in store.img_hw[store.row(img_id)])
    image = tmp_path / "image.jpg"
    Image.fromarray(np.full((img_h, img_w, 3), 200, dtype=np.uint8)).save(image)
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("".join(f"thing{k},synonym\n" for k in range(30)))

    out = tmp_path / "maps"
    paths = visualize.main(
        ["--model", str(model_dir), "--features", str(sample.features_tsv), "--img-id", img_id,
         "--sentence", "what color is the dog?", "--out-dir", str(out), "--image", str(image),
         "--objects-vocab", str(vocab), "--tokenizer", str(sample.tokenizer_dir)]
    )  # fmt: skip
    names = sorted(p.name for p in paths)
    assert names == [
        "boxes.png",
        "cross_attention_language_to_vision.png",
        "cross_attention_vision_to_language.png",
        "language_self_attention.png",
        "object_relationship_attention.png",
    ]
    for p in paths:
        (h, w), variance = _png_stats(p)
        assert h >= 200 and w >= 300, (p.name, h, w)
        assert variance > 10.0, f"{p.name} is blank"
    assert "wrote" in capsys.readouterr().out


def test_one_head_and_labels(sample, model_dir):
    model = LxmertModel.from_pretrained(model_dir, backend="torch").eval()
    tokenizer = load_tokenizer(sample.tokenizer_dir)
    feats, boxes, class_ids, _ = attention.load_image_features(sample.features_tsv, "sample_000001")
    averaged = attention.attention_maps(model, tokenizer, "is there a cat?", feats, boxes)
    per_head = [attention.attention_maps(model, tokenizer, "is there a cat?", feats, boxes, head=h) for h in range(4)]
    tokens = averaged["tokens"]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    n_words, n_objects = len(tokens), feats.shape[1]
    for kind, shape in (
        ("language", (n_words, n_words)),
        ("vision", (n_objects, n_objects)),
        ("language_to_vision", (n_words, n_objects)),
        ("vision_to_language", (n_objects, n_words)),
    ):
        assert len(averaged[kind]) == 2 and averaged[kind][0].shape == shape
        np.testing.assert_allclose(averaged[kind][1].sum(-1), 1.0, atol=1e-5)  # rows are distributions
        mean_of_heads = np.mean([m[kind][1] for m in per_head], axis=0)
        np.testing.assert_allclose(averaged[kind][1], mean_of_heads, atol=1e-6)
    assert not np.allclose(per_head[0]["language"][0], per_head[1]["language"][0])
    assert attention.object_labels(class_ids[:2]) == [f"0:{class_ids[0]}", f"1:{class_ids[1]}"]
    assert attention.object_labels([1, 99], ["dog", "cat"]) == ["0:cat", "1:99"]  # an id past the vocabulary


def test_bad_head_and_image_id_are_clear_errors(sample, model_dir, tmp_path):
    common = ["--model", str(model_dir), "--features", str(sample.features_tsv), "--sentence", "a dog",
              "--out-dir", str(tmp_path), "--tokenizer", str(sample.tokenizer_dir)]  # fmt: skip
    with pytest.raises(InputError, match=r"--head 7: the model has heads 0..3"):
        visualize.main([*common, "--img-id", "sample_000000", "--head", "7"])
    with pytest.raises(InputError, match=r"--img-id nope: img_id 'nope' is not in the feature store"):
        visualize.main([*common, "--img-id", "nope"])


def test_missing_matplotlib_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[plot\]"'):
        visualize.main(["--model", "m", "--features", "f.tsv", "--img-id", "i", "--sentence", "s"])


def test_object_names_from_the_samples_vocabulary_one_scale_and_a_wrong_image_refused(sample, model_dir, tmp_path):
    from PIL import Image

    from lxmert_fast.data.sample import OBJECT_NAMES

    vocab = attention.objects_vocab_beside(sample.features_tsv)
    assert vocab is not None and attention.read_objects_vocab(vocab) == list(OBJECT_NAMES)
    store = FeatureStore.from_tsv(sample.features_tsv, progress=False)
    img_id = store.img_ids[0]
    img_h, img_w = (int(v) for v in store.img_hw[store.row(img_id)])
    common = ["--model", str(model_dir), "--features", str(sample.features_tsv), "--img-id", img_id, "--sentence",
              "a dog", "--tokenizer", str(sample.tokenizer_dir)]
    wrong = tmp_path / "wrong.jpg"
    Image.fromarray(np.full((img_h, img_w * 2, 3), 200, dtype=np.uint8)).save(wrong)
    with pytest.raises(InputError, match=rf"wrong.jpg: {img_w * 2}x{img_h} pixels, but the features were extracted "
                                         rf"from an image of {img_w}x{img_h}"):
        visualize.main([*common, "--out-dir", str(tmp_path / "a"), "--image", str(wrong)])
    half = tmp_path / "half.jpg"  # the same image at half the size: fitted
    Image.fromarray(np.full((img_h // 2, img_w // 2, 3), 200, dtype=np.uint8)).save(half)
    assert len(visualize.main([*common, "--out-dir", str(tmp_path / "b"), "--image", str(half)])) == 5
    drawn = []
    original = attention.plot_layers

    def spy(maps, rows, cols, *args, **kwargs):
        drawn.append((rows, cols))
        return original(maps, rows, cols, *args, **kwargs)

    attention.plot_layers = spy
    try:
        visualize.main([*common, "--out-dir", str(tmp_path / "c")])
    finally:
        attention.plot_layers = original
    names = {label.split(":", 1)[1] for rows, _ in drawn[1:2] for label in rows}
    assert names <= set(OBJECT_NAMES) and names, names  # names, not class ids


def test_a_fine_tuned_folder_draws_without_a_load_report(sample, tmp_path, capfd):
    """The encoder of a task folder is read through its own class: transformers reports none of its head weights."""
    from lxmert_fast import LxmertForQuestionAnswering

    tokenizer = load_tokenizer(sample.tokenizer_dir)
    config = LxmertConfig(vocab_size=len(tokenizer), visual_feat_dim=32, hidden_size=32, num_attention_heads=4,
                          intermediate_size=64, l_layers=1, r_layers=1, x_layers=1, num_qa_labels=5)
    LxmertForQuestionAnswering(config, backend="torch").save_pretrained(tmp_path / "vqa")
    img_id = FeatureStore.from_tsv(sample.features_tsv, progress=False).img_ids[0]
    paths = visualize.main(["--model", str(tmp_path / "vqa"), "--features", str(sample.features_tsv), "--img-id",
                            img_id, "--sentence", "a dog", "--out-dir", str(tmp_path / "maps"), "--tokenizer",
                            str(sample.tokenizer_dir)])
    out, err = capfd.readouterr()
    assert len(paths) == 4 and "LOAD REPORT" not in out + err and "UNEXPECTED" not in out + err
