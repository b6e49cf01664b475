"""Checkpoints laid out exactly as the original code (airsplay/lxmert) saves them, and files we write for it.

The original saves `torch.save(model.state_dict(), path)`: pre-training `LXRTPretraining` wrapped in DataParallel
(`module.bert.*`, `module.cls.*`, ...: the released model_LXRT.pth); fine-tuning `VQAModel` / `GQAModel` /
`NLVR2Model` as `lxrt_encoder.model.bert.*` plus the head `logit_fc.{0,2,3}`, with `--multiGPU`
`lxrt_encoder.model.module.bert.*`. The files here are built key by key from a model of ours in that layout.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, model_inputs
from helpers import small_config as _small_config

import lxmert_fast
from lxmert_fast.convert import main as convert_main
from lxmert_fast.data.formats import AnswerTable
from lxmert_fast.model.weights import config_file_next_to, infer_config, save_original, to_hf_layout
from lxmert_fast.tasks.task_models import build_task_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
H = 64  # head size 64 as in the original, so that the head count inferred from the shapes is right


def small_config(**overrides):
    return _small_config(**{"hidden_size": H, "num_attention_heads": 1, **overrides})


def original_encoder_keys(state_dict, multi_gpu=False):
    """Our `lxmert.*` encoder weights under the original fine-tuning models' names."""
    prefix = "lxrt_encoder.model." + ("module." if multi_gpu else "") + "bert."
    return {prefix + k.removeprefix("lxmert."): v for k, v in state_dict.items() if k.startswith("lxmert.")}


def assert_same_weights(model, reference):
    state = model.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key


def nlvr2_inputs(config, batch=3, seed=0):
    pair = model_inputs(make_batch(config, batch=2 * batch, seed=seed, targets=False))
    text = {k: pair[k][:batch] for k in ("input_ids", "attention_mask", "token_type_ids")}
    images = {k: pair[k].view(batch, 2, *pair[k].shape[1:]) for k in ("visual_feats", "visual_pos")}
    images["visual_attention_mask"] = pair["visual_attention_mask"].view(batch, 2, -1)
    return {**text, **images}


@pytest.fixture
def nlvr2():
    torch.manual_seed(0)
    model = lxmert_fast.LxmertForNLVR2(small_config(), backend="torch").eval()
    with torch.no_grad():  # LayerNorm and biases away from their initial values, so a missed weight shows
        for p in model.logit_fc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_nlvr2_head_is_the_originals(nlvr2, tmp_path):
    """nlvr2_model.py: Linear(2H, 2H) -> GeLU -> LayerNorm(2H, eps 1e-12) -> Linear(2H, 2) on the two pooled
    vectors concatenated; an original NLVR2 checkpoint loads its head and gives the original's logits."""
    pair = 2 * H
    expected_shapes = {
        "logit_fc.0.weight": (pair, pair),
        "logit_fc.0.bias": (pair,),
        "logit_fc.2.weight": (pair,),
        "logit_fc.2.bias": (pair,),
        "logit_fc.3.weight": (2, pair),
        "logit_fc.3.bias": (2,),
    }
    head = {k: tuple(v.shape) for k, v in nlvr2.state_dict().items() if k.startswith("logit_fc.")}
    assert head == expected_shapes

    state = nlvr2.state_dict()
    saved = {**original_encoder_keys(state), **{k: state[k] for k in expected_shapes}}
    torch.save(saved, tmp_path / "BEST.pth")
    loaded = lxmert_fast.LxmertForNLVR2.from_pretrained(tmp_path / "BEST.pth", backend="torch").eval()
    assert_same_weights(loaded, nlvr2)

    inputs = nlvr2_inputs(nlvr2.config)
    with torch.no_grad():
        out = loaded(**inputs)
        x = out.pooled_output.flatten(1)  # (B, 2H): [pooled(img0, sent), pooled(img1, sent)]
        x = F.gelu(x @ saved["logit_fc.0.weight"].T + saved["logit_fc.0.bias"])  # the original's erf GeLU
        x = F.layer_norm(x, (pair,), saved["logit_fc.2.weight"], saved["logit_fc.2.bias"], eps=1e-12)
        logits = x @ saved["logit_fc.3.weight"].T + saved["logit_fc.3.bias"]
    torch.testing.assert_close(out.logits, logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("multi_gpu", [False, True], ids=["plain", "multiGPU"])
@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr2"])
def test_original_fine_tuned_checkpoints_load_with_their_heads(task, multi_gpu, tmp_path, caplog):
    """vqa.py / gqa.py / nlvr2.py `save`: `torch.save(self.model.state_dict(), ...)` with `logit_fc.*` at the top,
    through from_pretrained (no config: inferred) and through fine-tuning's --load."""
    torch.manual_seed(1)
    if task == "nlvr2":
        source = lxmert_fast.LxmertForNLVR2(small_config(), backend="torch").eval()
        head = source.logit_fc.state_dict()
        inputs = nlvr2_inputs(source.config)
    else:
        source = lxmert_fast.LxmertForQuestionAnswering(small_config(num_qa_labels=7), backend="torch").eval()
        head = source.answer_head.logit_fc.state_dict()
        inputs = model_inputs(make_batch(source.config))
    with torch.no_grad():
        for p in head.values():
            p.add_(0.1 * torch.randn_like(p))
    saved = {**original_encoder_keys(source.state_dict(), multi_gpu), **{"logit_fc." + k: v for k, v in head.items()}}
    path = tmp_path / f"{task}_BEST.pth"
    torch.save(saved, path)

    with caplog.at_level(logging.WARNING):
        loaded = type(source).from_pretrained(path, backend="torch").eval()  # missing heads are an error
    assert str(path) in caplog.text and "attention heads" in caplog.text  # guessed, and said so
    assert_same_weights(loaded, source)
    with torch.no_grad():
        if task == "nlvr2":
            torch.testing.assert_close(loaded(**inputs).logits, source(**inputs).logits, rtol=0, atol=0)
        else:
            got, want = loaded(**inputs).question_answering_score, source(**inputs).question_answering_score
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    messages = []
    label2ans = None if task == "nlvr2" else [f"answer {i}" for i in range(7)]
    tuned = build_task_model(task, load=path, label2ans=label2ans, backend="torch", log=messages.append)
    assert "task head loaded" in messages[-1]
    assert_same_weights(tuned, source)


def test_visual_losses_use_the_originals_weight_where_the_original_is_used(tmp_path):
    """The original scales each visual loss by 1 / 0.15, transformers' config by 6.67: a config inferred from an
    original checkpoint and the presets of configs/ take the original's, transformers' configs keep theirs."""
    assert lxmert_fast.LxmertConfig().visual_loss_normalizer == 6.67
    torch.manual_seed(2)
    model = lxmert_fast.LxmertForPreTraining(small_config(), backend="torch").eval()
    model.save_pretrained(tmp_path / "hf")
    assert lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "hf").config.visual_loss_normalizer == 6.67

    save_original(model.state_dict(), tmp_path / "model_LXRT.pth")
    original = lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "model_LXRT.pth", backend="torch").eval()
    assert original.config.visual_loss_normalizer == 1 / 0.15
    batch = make_batch(model.config)
    with torch.no_grad():
        ours = original(**batch, return_task_losses=True).task_losses
        hf = model(**batch, return_task_losses=True).task_losses
    for key in ("obj", "attr", "feat"):
        torch.testing.assert_close(ours[key], hf[key] / 6.67 / 0.15, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours["mlm"], hf["mlm"], rtol=0, atol=0)

    for preset in ("lxmert_base", "lxmert_small"):
        config = json.loads((CONFIGS / f"{preset}.json").read_text())
        assert config["visual_loss_normalizer"] == 1 / 0.15, preset


def simulate_original_loaders(raw, model_keys):
    """Which of the original model's keys each of the original code's loaders would fill from the file `raw`
    (following their key handling: src/pretrain/lxmert_pretrain.py `load_lxmert`, src/lxrt/entry.py
    `LXRTEncoder.load`, src/pretrain/qa_answer_table.py `load_lxmert_qa`)."""
    # load_lxmert: drops keys with 'answer', keeps ONLY keys that start with "module." and strips that prefix
    pretraining = {k.removeprefix("module.") for k in raw if "answer" not in k and k.startswith("module.")}
    # LXRTEncoder.load: strips a leading "module." if there is one, into a model holding bert.* only
    encoder = {k.removeprefix("module.") for k in raw}
    # load_lxmert_qa: removes "module." anywhere; takes bert.* and answer_head.*
    qa = {k.replace("module.", "") for k in raw}
    encoder_keys = {k for k in model_keys if k.startswith("bert.")}
    return {
        "load_lxmert": {k for k in model_keys if not k.startswith("answer_head.")} - pretraining,
        "LXRTEncoder.load": encoder_keys - encoder,
        "load_lxmert_qa": (encoder_keys | {k for k in model_keys if k.startswith("answer_head.")}) - qa,
    }


def test_converted_back_file_is_laid_out_as_the_release(tmp_path):
    """`convert folder/ model_LXRT.pth` writes `module.bert.*`, ... as the released file (the original
    pre-training script's load_lxmert loads nothing without the prefix), with every key each original loader needs."""
    torch.manual_seed(3)
    model = lxmert_fast.LxmertForPreTraining(small_config(), backend="torch")
    model.save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "model_LXRT.pth")]) == 0
    raw = torch.load(tmp_path / "model_LXRT.pth", weights_only=True)
    assert all(key.startswith("module.") for key in raw)

    ours = model.state_dict()  # the tied LM decoder included, as the original stores it
    original_keys = {("bert." + k.removeprefix("lxmert.")) if k.startswith("lxmert.") else k for k in ours}
    assert "cls.predictions.decoder.weight" in original_keys and "bert.pooler.dense.weight" in original_keys
    assert simulate_original_loaders(raw, original_keys) == {
        "load_lxmert": set(),
        "LXRTEncoder.load": set(),
        "load_lxmert_qa": set(),
    }
    for key, value in ours.items():
        original = "module." + (("bert." + key.removeprefix("lxmert.")) if key.startswith("lxmert.") else key)
        assert torch.equal(raw[original], value), key

    no_prefix = {k.removeprefix("module."): v for k, v in raw.items()}  # what the converter used to write
    assert simulate_original_loaders(no_prefix, original_keys)["load_lxmert"] == original_keys - {
        k for k in original_keys if k.startswith("answer_head.")
    }


def test_a_bare_encoder_is_written_as_the_originals_bert(tmp_path):
    encoder = lxmert_fast.LxmertModel(small_config(), backend="torch")
    save_original(encoder.state_dict(), tmp_path / "encoder.pth")
    raw = torch.load(tmp_path / "encoder.pth", weights_only=True)
    assert raw.keys() == {"module.bert." + key for key in encoder.state_dict()}


def test_head_count_survives_the_round_trip_and_a_guess_is_announced(tmp_path, caplog):
    """A head count that hidden / 64 does not give (128 / 4 heads) comes back through the config written next to
    the .pth; without that file, the guess (2 heads) is logged as a warning naming the file."""
    torch.manual_seed(4)
    model = lxmert_fast.LxmertForPreTraining(small_config(hidden_size=128, num_attention_heads=4), backend="torch")
    model.eval().save_pretrained(tmp_path / "hf")
    pth = tmp_path / "model_LXRT.pth"
    assert convert_main([str(tmp_path / "hf"), str(pth)]) == 0
    assert config_file_next_to(pth) == tmp_path / "model_LXRT.config.json"
    assert json.loads(config_file_next_to(pth).read_text())["num_attention_heads"] == 4
    assert convert_main([str(pth), str(tmp_path / "back")]) == 0
    back = lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "back", backend="torch").eval()
    assert back.config.num_attention_heads == 4
    batch = model_inputs(make_batch(model.config))
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).cross_relationship_score, model(**batch).cross_relationship_score)

    config_file_next_to(pth).unlink()
    with caplog.at_level(logging.WARNING):
        guessed = lxmert_fast.LxmertForPreTraining.from_pretrained(pth, backend="torch")
    assert guessed.config.num_attention_heads == 2
    assert str(pth) in caplog.text and "assuming 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        infer_config(to_hf_layout(torch.load(pth, weights_only=True)), source=pth, num_attention_heads=4)
    assert not caplog.text


# ---------------------------------------------------------------------------------------------------- answers
@pytest.fixture
def table(tmp_path):
    answers = ["yes", "0", "zero", "2", "gray", "man", "dog"]  # the released all_ans.json has "zero" and "0"
    path = tmp_path / "all_ans.json"
    path.write_text(json.dumps([{"ans": a, "dsets": ["vqa"]} for a in answers]))
    return AnswerTable(path)


def test_pretraining_labels_merge_as_the_original(table):
    """src/pretrain/lxmert_data.py: each raw answer in turn is normalised and moved to its normalised name,
    replacing the score already there; answers the table lacks are dropped."""
    assert table.label_scores({"two": 0.3, "2": 0.9}) == {3: 0.3}
    assert table.label_scores({"2": 0.9, "two": 0.3}) == {3: 0.3}
    assert table.label_scores({"a man": 0.3, "the man": 0.6, "The Dog.": 1.0}) == {5: 0.6, 6: 1.0}
    assert table.label_scores({"zero": 0.5, "0": 1.0, "cat": 1.0, " yes": 1.0}) == {2: 0.5, 1: 1.0}


def test_load_lxmert_qa_keeps_zero_and_0_apart(table, tmp_path):
    torch.manual_seed(5)
    source = lxmert_fast.LxmertForPreTraining(small_config(num_qa_labels=len(table)), backend="torch")
    save_original(source.state_dict(), tmp_path / "model_LXRT.pth")
    label2ans = ["zero", "0", "Two", " yes", "a the dog"]
    model = build_task_model(
        "vqa", load_qa=tmp_path / "model_LXRT.pth", answer_table=table, label2ans=label2ans, log=lambda *a: None
    )
    rows = source.answer_head.logit_fc[3].weight
    head = model.answer_head.logit_fc[3].weight
    for label, row in {0: 2, 1: 1, 2: 3, 4: 6}.items():  # "a the dog" -> "the dog" -> "dog"
        torch.testing.assert_close(head[label], rows[row], rtol=0, atol=0)
    assert not head[3].any()  # " yes": the original strips no leading space
