"""What a transformers user calls works on our models, because it is transformers' own code: the hub (a local cache
laid out as huggingface_hub lays it out, offline), from_pretrained/save_pretrained keywords, resizing, gradient
checkpointing; and tracing, export and compilation on batches of any padding."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers
from helpers import make_batch, model_inputs, small_config

import lxmert_fast
from lxmert_fast.errors import CheckpointError

ATOL = 1e-5


def tiny(**overrides):
    return small_config("tiny", **overrides)


def padded_like(batch, lengths):
    """The same batch with other text lengths (rows of `lengths` real tokens, the rest padding)."""
    mask = torch.zeros_like(batch["attention_mask"])
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return {**batch, "attention_mask": mask}


def hub_cache(root, repo_id, model):
    """Save `model` into `root` the way huggingface_hub caches a download: models--org--name/snapshots/<commit>/
    with refs/main naming the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_load_offline_from_the_hub_cache(tmp_path):
    torch.manual_seed(0)
    pretrained = lxmert_fast.LxmertForPreTraining(tiny()).eval()
    vqa = lxmert_fast.LxmertForQuestionAnswering(tiny(num_qa_labels=7)).eval()
    hub_cache(tmp_path, "unc-nlp/lxmert-base-uncased", pretrained)
    hub_cache(tmp_path, "unc-nlp/lxmert-vqa-uncased", vqa)
    torch.save(
        {"base": pretrained.state_dict(), "vqa": vqa.state_dict()}, tmp_path / "expected.pt"
    )  # what the cache must give back
    script = textwrap.dedent(
        f"""
        import torch
        from lxmert_fast import LxmertForPreTraining, LxmertForQuestionAnswering
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        base = LxmertForPreTraining.from_pretrained("unc-nlp/lxmert-base-uncased")
        vqa = LxmertForQuestionAnswering.from_pretrained("unc-nlp/lxmert-vqa-uncased", backend="torch")
        for model, want in ((base, expected["base"]), (vqa, expected["vqa"])):
            got = model.state_dict()
            assert got.keys() == want.keys()
            assert all(torch.equal(got[key], want[key]) for key in want)
        assert vqa.num_qa_labels == 7 and vqa.backend == "torch" and not base.training
        print("loaded")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["loaded"]


def test_from_pretrained_keywords(tmp_path):
    torch.manual_seed(0)
    model = lxmert_fast.LxmertForQuestionAnswering(tiny()).eval()
    model.save_pretrained(tmp_path)
    cls = lxmert_fast.LxmertForQuestionAnswering

    half = cls.from_pretrained(tmp_path, dtype=torch.float16)
    assert (
        half.dtype == torch.float16
        and cls.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    )
    loaded, info = cls.from_pretrained(pretrained_model_name_or_path=tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert cls.from_pretrained(tmp_path, local_files_only=True, output_hidden_states=True).config.output_hidden_states

    state = {key: value + 1 for key, value in model.state_dict().items()}
    shifted = cls.from_pretrained(None, config=model.config, state_dict=state)
    torch.testing.assert_close(shifted.answer_head.logit_fc[0].bias, model.answer_head.logit_fc[0].bias + 1)

    resized = cls.from_pretrained(tmp_path, num_qa_labels=5, ignore_mismatched_sizes=True)
    assert resized.answer_head.logit_fc[-1].out_features == 5
    torch.testing.assert_close(resized.lxmert.pooler.dense.weight, model.lxmert.pooler.dense.weight)

    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = cls.from_pretrained(tmp_path / "sharded", backend="torch")
    batch = model_inputs(make_batch(model.config))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).question_answering_score, model(**batch).question_answering_score)


def test_transformers_model_api():
    config = tiny()
    model = lxmert_fast.LxmertForPreTraining(config)
    assert model.config is config and model.base_model is model.lxmert and model.main_input_name == "input_ids"
    assert isinstance(model, transformers.PreTrainedModel) and not model.can_generate()
    assert model.config_class is lxmert_fast.LxmertConfig and model.supports_gradient_checkpointing
    assert model.get_input_embeddings() is model.lxmert.embeddings.word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    everything = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == everything
    embeddings = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    assert model.num_parameters(exclude_embeddings=True) == everything - embeddings
    model.lxmert.pooler.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == everything - sum(
        p.numel() for p in model.lxmert.pooler.parameters()
    )
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"

    qa = lxmert_fast.LxmertForQuestionAnswering(tiny())
    new = torch.nn.Embedding(config.vocab_size, config.hidden_size)
    qa.set_input_embeddings(new)
    assert qa.get_input_embeddings() is new and qa.lxmert.embeddings.word_embeddings is new
    qa.enable_input_require_grads()
    out = qa(**model_inputs(make_batch(qa.config)))
    assert out.question_answering_score.requires_grad


def test_resize_token_embeddings_and_qa_labels():
    config = tiny()
    model = lxmert_fast.LxmertForPreTraining(config).eval()
    batch = make_batch(config)
    vocab, answers = config.vocab_size, config.num_qa_labels
    old_bias = model.cls.predictions.bias.detach().clone()
    model.resize_token_embeddings(vocab + 5)
    assert model.cls.predictions.decoder.weight is model.lxmert.embeddings.word_embeddings.weight
    assert model.cls.predictions.bias.shape == (vocab + 5,) and config.vocab_size == vocab + 5
    torch.testing.assert_close(model.cls.predictions.bias[:vocab], old_bias)
    assert model(**batch).prediction_logits.shape[-1] == vocab + 5

    old_answers = model.answer_head.logit_fc[-1].weight.detach().clone()
    model.resize_num_qa_labels(answers + 3)
    assert model.num_qa_labels == config.num_qa_labels == answers + 3
    torch.testing.assert_close(model.answer_head.logit_fc[-1].weight[: len(old_answers)], old_answers)
    out = model(**{**batch, "ans": torch.tensor([0, answers + 2, 2])})
    assert out.question_answering_score.shape == (3, answers + 3) and torch.isfinite(out.loss)


def test_forward_rejects_unknown_keywords_and_maps_masked_lm_labels():
    config = tiny()
    model = lxmert_fast.LxmertForPreTraining(config).eval()
    batch = make_batch(config)
    with pytest.raises(TypeError, match="lxmert_labels"):
        model(**batch, lxmert_labels=None)
    with pytest.raises(TypeError):
        lxmert_fast.LxmertModel(config)(**model_inputs(batch), labels=batch["labels"])
    labels = batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch, labels=labels, return_task_losses=True)
        with pytest.warns(FutureWarning, match="masked_lm_labels"):
            old_name = model(**batch, masked_lm_labels=labels, return_task_losses=True)
    assert type(expected) is transformers.models.lxmert.modeling_lxmert.LxmertForPreTrainingOutput
    torch.testing.assert_close(old_name.task_losses["mlm"], expected.task_losses["mlm"])
    torch.testing.assert_close(old_name.loss, expected.loss)
    with pytest.raises(ValueError, match="labels= only"):
        model(**batch, labels=labels, masked_lm_labels=labels)
    assert not hasattr(model(**batch, labels=labels), "task_losses")  # only when asked for


def test_gradient_checkpointing_gives_the_same_gradients():
    """transformers' switch; dropout on, so the recomputation must replay the same masks."""
    config = tiny(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = lxmert_fast.LxmertForPreTraining(config, backend="torch").train()
    batch = make_batch(config)

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)
        model(**batch).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable()  # transformers 5's name of gradient_checkpointing_enable
    layers = [*model.lxmert.encoder.layer, *model.lxmert.encoder.r_layers, *model.lxmert.encoder.x_layers]
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in layers)
    calls = []
    for layer in layers:
        layer._gradient_checkpointing_func = lambda *args, run=layer._gradient_checkpointing_func: (
            calls.append(1) or run(*args)
        )
    checkpointed = gradients()
    assert len(calls) == len(layers)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    model.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in layers)


OTHER_PADDING = (9, 2, 5)  # make_batch's rows have 9, 6 and 3 real tokens


def test_jit_trace_serves_any_padding():
    config = tiny(torchscript=True, return_dict=False)
    model = lxmert_fast.LxmertForQuestionAnswering(config, backend="torch").eval()
    batch = model_inputs(make_batch(config))
    keys = ("input_ids", "visual_feats", "visual_pos", "attention_mask", "visual_attention_mask", "token_type_ids")
    with torch.no_grad():
        traced = torch.jit.trace(model, tuple(batch[key] for key in keys))
        for inputs in (batch, padded_like(batch, OTHER_PADDING)):
            torch.testing.assert_close(traced(*(inputs[key] for key in keys))[0], model(**inputs)[0], atol=ATOL, rtol=0)


def test_torch_export_serves_any_padding():
    config = tiny()
    model = lxmert_fast.LxmertModel(config, backend="torch").eval()
    batch = model_inputs(make_batch(config))
    exported = torch.export.export(model, (), kwargs=batch)
    for inputs in (batch, padded_like(batch, OTHER_PADDING)):
        got = exported.module()(**inputs)
        with torch.no_grad():
            want = model(**inputs)
        keep = inputs["attention_mask"].bool()
        torch.testing.assert_close(got.language_output[keep], want.language_output[keep], atol=ATOL, rtol=0)
        torch.testing.assert_close(got.pooled_output, want.pooled_output, atol=ATOL, rtol=0)


def test_torch_compile_serves_any_padding():
    config = tiny()
    model = lxmert_fast.LxmertForQuestionAnswering(config, backend="torch").eval()
    batch = model_inputs(make_batch(config))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for inputs in (batch, padded_like(batch, OTHER_PADDING)):
            got, want = compiled(**inputs), model(**inputs)
            torch.testing.assert_close(got.question_answering_score, want.question_answering_score, atol=ATOL, rtol=0)
    torch._dynamo.reset()


def test_strict_loading_of_the_original_layout_still_names_the_keys(tmp_path):
    model = lxmert_fast.LxmertForPreTraining(tiny())
    state = {key.replace("lxmert.", "bert.", 1): value for key, value in model.state_dict().items()}
    del state["bert.encoder.x_layers.0.lang_inter.dense.weight"]
    torch.save(state, tmp_path / "model_LXRT.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match=r"model_LXRT\.pth: missing encoder weights: .*lang_inter"):
            lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "model_LXRT.pth", config=tiny())
