"""Checkpoint formats: HF folders both ways, the original model_LXRT.pth, the converter, and bad files."""

import logging
import os
import pickle

import pytest
import torch
import transformers
from helpers import make_batch, model_inputs
from helpers import small_config as _small_config

import lxmert_fast
from lxmert_fast.convert import main as convert_main
from lxmert_fast.errors import CheckpointError
from lxmert_fast.model.weights import read_state_dict, save_original, to_hf_layout


def small_config(**overrides):
    # head size 64, as in the original: the only head count that can be inferred from a bare model_LXRT.pth
    return _small_config(**{"hidden_size": 64, "num_attention_heads": 1, **overrides})


def outputs_equal(a, b, batch):
    with torch.no_grad():
        x, y = a.eval()(**batch), b.eval()(**batch)
    real = batch["attention_mask"].bool()  # the padding is packed away: its logits are not comparable
    torch.testing.assert_close(x.prediction_logits[real], y.prediction_logits[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(x.question_answering_score, y.question_answering_score, atol=1e-6, rtol=0)


@pytest.fixture
def pretrained():
    torch.manual_seed(0)
    return lxmert_fast.LxmertForPreTraining(small_config(), backend="torch").eval()


def test_save_pretrained_loads_in_transformers_and_back(pretrained, tmp_path):
    pretrained.save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]
    hf = transformers.LxmertForPreTraining.from_pretrained(tmp_path / "ours")
    batch = model_inputs(make_batch(pretrained.config))
    outputs_equal(pretrained, hf, batch)
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.lxmert.embeddings.word_embeddings.weight.data_ptr()

    hf.save_pretrained(tmp_path / "hf")
    again = lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "hf")
    outputs_equal(again, hf, batch)
    # the tied decoder is tied again after loading
    assert again.cls.predictions.decoder.weight is again.lxmert.embeddings.word_embeddings.weight


def test_pytorch_model_bin_folder_loads(pretrained, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    pretrained.config.to_json_file(folder / "config.json")
    torch.save(pretrained.state_dict(), folder / "pytorch_model.bin")
    outputs_equal(
        lxmert_fast.LxmertForPreTraining.from_pretrained(folder),
        pretrained,
        model_inputs(make_batch(pretrained.config)),
    )


def test_original_checkpoint_with_dataparallel_prefix(tmp_path):
    """model_LXRT.pth: `module.bert.*` keys, no config file: the sizes are inferred from the shapes (heads from the
    original's head size of 64)."""
    pretrained = lxmert_fast.LxmertForPreTraining(small_config(hidden_size=128, num_attention_heads=2))
    path = tmp_path / "model_LXRT.pth"
    save_original(pretrained.state_dict(), path)
    raw = torch.load(path, weights_only=True)
    prefixes = ("module.bert.", "module.cls.", "module.obj_predict_head.", "module.answer_head.")
    assert all(key.startswith(prefixes) for key in raw)
    loaded = lxmert_fast.LxmertForPreTraining.from_pretrained(path)
    for field in (
        "hidden_size",
        "l_layers",
        "x_layers",
        "r_layers",
        "num_qa_labels",
        "num_object_labels",
        "num_attr_labels",
        "visual_feat_dim",
        "vocab_size",
        "intermediate_size",
        "num_attention_heads",
    ):
        assert getattr(loaded.config, field) == getattr(pretrained.config, field), field
    outputs_equal(loaded, pretrained, model_inputs(make_batch(pretrained.config)))


def test_converter_round_trip(pretrained, tmp_path):
    original = tmp_path / "model_LXRT.pth"
    save_original(pretrained.state_dict(), original)
    assert convert_main([str(original), str(tmp_path / "hf")]) == 0
    hf = transformers.LxmertForPreTraining.from_pretrained(tmp_path / "hf")
    outputs_equal(hf, pretrained, model_inputs(make_batch(pretrained.config)))
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    first = torch.load(original, weights_only=True)
    assert back.keys() == first.keys()
    for key in first:
        assert torch.equal(back[key], first[key]), key


def test_encoder_and_qa_models_load_from_a_pretraining_checkpoint(pretrained, tmp_path):
    pretrained.save_pretrained(tmp_path)
    batch = model_inputs(make_batch(pretrained.config))
    encoder = lxmert_fast.LxmertModel.from_pretrained(tmp_path).eval()
    qa = lxmert_fast.LxmertForQuestionAnswering.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch).pooled_output, pretrained.lxmert(**batch).pooled_output)
        torch.testing.assert_close(qa(**batch).question_answering_score, pretrained(**batch).question_answering_score)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model_LXRT.pth"
    with open(path, "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": Exploit()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        lxmert_fast.LxmertForPreTraining.from_pretrained(path)
    assert not marker.exists()


def test_corrupt_files_name_the_file(pretrained, tmp_path):
    pretrained.save_pretrained(tmp_path / "good")
    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
    torch.save(pretrained.state_dict(), tmp_path / "model.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "model.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_state_dict(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="no weights file"):
        read_state_dict(tmp_path / "good" / "..")


def test_checkpoints_that_do_not_fit_name_the_keys(pretrained, tmp_path):
    """transformers' loader reports what does not fit (output_loading_info); missing_heads="error" turns the report
    into an error naming the keys."""
    pretrained.save_pretrained(tmp_path)
    model, info = lxmert_fast.LxmertForPreTraining.from_pretrained(
        tmp_path, config=small_config(l_layers=4), output_loading_info=True
    )
    assert any(key.startswith("lxmert.encoder.layer.3.") for key in info["missing_keys"])
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: lxmert\.encoder\.layer\.3\."):
        lxmert_fast.LxmertForPreTraining.from_pretrained(
            tmp_path, config=small_config(l_layers=4), missing_heads="error"
        )
    with pytest.raises(CheckpointError, match=r"does not have: lxmert\.encoder\.layer\.2\."):
        lxmert_fast.LxmertForPreTraining.from_pretrained(
            tmp_path, config=small_config(l_layers=2), missing_heads="error"
        )
    with pytest.raises(
        CheckpointError, match=r"answer_head\.logit_fc\.3\.weight: checkpoint \(11, 128\) vs model \(5, 128\)"
    ):
        lxmert_fast.LxmertForPreTraining.from_pretrained(
            tmp_path, config=small_config(num_qa_labels=5), missing_heads="error", ignore_mismatched_sizes=True
        )


def test_missing_heads_start_from_random_as_in_transformers_unless_strict(tmp_path):
    encoder = lxmert_fast.LxmertModel(small_config())
    encoder.save_pretrained(tmp_path)
    model, info = lxmert_fast.LxmertForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and all(key.startswith("answer_head.") for key in info["missing_keys"])
    torch.testing.assert_close(model.lxmert.pooler.dense.weight, encoder.pooler.dense.weight)
    assert model.answer_head.logit_fc[0].weight.std() > 0  # initialised, not left empty
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: .*cls\.predictions"):
        lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path, missing_heads="error")


def test_original_checkpoint_lacking_heads_is_an_error_only_when_asked(tmp_path, caplog):
    encoder = lxmert_fast.LxmertModel(small_config())
    save_original(encoder.state_dict(), tmp_path / "encoder.pth")
    with pytest.raises(CheckpointError, match=r"lacks these head weights .*cls\.predictions"):
        lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "encoder.pth", missing_heads="error")
    with caplog.at_level(logging.WARNING):
        model = lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "encoder.pth")
    assert "start from random" in caplog.text and "answer_head" in caplog.text
    torch.testing.assert_close(model.lxmert.pooler.dense.weight, encoder.pooler.dense.weight)


def test_hf_layout_mapping():
    mapped = to_hf_layout(
        {
            "module.bert.pooler.dense.bias": torch.zeros(1),
            "module.cls.seq_relationship.bias": torch.zeros(2),
            "lxrt_encoder.model.bert.embeddings.LayerNorm.weight": torch.zeros(1),
            "lxrt_encoder.model.module.bert.embeddings.LayerNorm.bias": torch.zeros(1),
        }
    )
    assert set(mapped) == {
        "lxmert.pooler.dense.bias",
        "cls.seq_relationship.bias",
        "lxmert.embeddings.LayerNorm.weight",
        "lxmert.embeddings.LayerNorm.bias",
    }
