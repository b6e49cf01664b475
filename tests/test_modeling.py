"""The torch path equals transformers' LXMERT: outputs, losses and gradients, on random weights (no download)."""

import pytest
import torch
import transformers
from helpers import SMALL_CONFIGS, make_batch, model_inputs, small_config

import lxmert_fast
from lxmert_fast.model.modeling import FusedOps, resolve_backend

ATOL = 1e-5


def paired(hf_class, our_class, config, train=False):
    torch.manual_seed(0)
    hf = hf_class(config)
    ours = our_class(config, backend="torch")
    ours.load_state_dict(hf.state_dict(), strict=True)
    hf.train(train)
    ours.train(train)
    return hf, ours


def assert_close_masked(a, b, mask, what):
    """Compare (B, N, ...) tensors at the non-padded positions (mask (B, N))."""
    keep = mask.bool()
    assert a.shape == b.shape, what
    torch.testing.assert_close(a[keep], b[keep], atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_model_outputs_equal_transformers(name):
    config = small_config(name)
    hf, ours = paired(transformers.LxmertModel, lxmert_fast.LxmertModel, config)
    batch = model_inputs(make_batch(config))
    kwargs = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        expected, actual = hf(**batch, **kwargs), ours(**batch, **kwargs)
    lang_mask, visn_mask = batch["attention_mask"], batch["visual_attention_mask"]
    assert list(expected.keys()) == list(actual.keys())
    assert_close_masked(expected.language_output, actual.language_output, lang_mask, "language_output")
    assert_close_masked(expected.vision_output, actual.vision_output, visn_mask, "vision_output")
    torch.testing.assert_close(expected.pooled_output, actual.pooled_output, atol=ATOL, rtol=0)
    assert len(actual.language_hidden_states) == config.l_layers + config.x_layers
    assert len(actual.vision_hidden_states) == config.r_layers + config.x_layers
    for e, a in zip(expected.language_hidden_states, actual.language_hidden_states, strict=True):
        assert_close_masked(e, a, lang_mask, "language_hidden_states")
    for e, a in zip(expected.vision_hidden_states, actual.vision_hidden_states, strict=True):
        assert_close_masked(e, a, visn_mask, "vision_hidden_states")
    for field in ("language_attentions", "vision_attentions", "cross_encoder_attentions"):
        for e, a in zip(expected[field], actual[field], strict=True):
            torch.testing.assert_close(e, a, atol=ATOL, rtol=0, msg=field)


def test_sdpa_and_packed_path_equals_explicit_attention_path():
    """Without attention outputs the torch path packs the text and uses SDPA; it must give what the explicit
    padded softmax path gives, and zeros at the packed-away padding."""
    config = small_config()
    model = lxmert_fast.LxmertModel(config, backend="torch").eval()
    batch = model_inputs(make_batch(config))
    with torch.no_grad():
        fast = model(**batch)
        explicit = model(**batch, output_attentions=True)
    assert_close_masked(fast.language_output, explicit.language_output, batch["attention_mask"], "language")
    assert_close_masked(fast.vision_output, explicit.vision_output, batch["visual_attention_mask"], "vision")
    assert (fast.language_output[~batch["attention_mask"].bool()] == 0).all()
    unpacked = lxmert_fast.LxmertModel(config, backend="torch", pack_text=False).eval()
    unpacked.load_state_dict(model.state_dict())
    with torch.no_grad():
        padded = unpacked(**batch)
    assert_close_masked(fast.language_output, padded.language_output, batch["attention_mask"], "language")


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_pretraining_loss_and_gradients_equal_transformers(name):
    config = small_config(name)
    hf, ours = paired(transformers.LxmertForPreTraining, lxmert_fast.LxmertForPreTraining, config, train=True)
    batch = make_batch(config, seed=1)
    expected, actual = hf(**batch), ours(**batch, return_task_losses=True)
    torch.testing.assert_close(actual.loss, expected.loss, atol=ATOL, rtol=0)
    assert set(actual.task_losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    torch.testing.assert_close(sum(actual.task_losses.values()), actual.loss)
    assert_close_masked(actual.prediction_logits, expected.prediction_logits, batch["attention_mask"], "logits")
    torch.testing.assert_close(actual.question_answering_score, expected.question_answering_score, atol=ATOL, rtol=0)
    expected.loss.backward()
    actual.loss.backward()
    ours_params = dict(ours.named_parameters())
    for param_name, param in hf.named_parameters():
        torch.testing.assert_close(ours_params[param_name].grad, param.grad, atol=ATOL, rtol=1e-4, msg=param_name)


@pytest.mark.parametrize(
    "disabled", ["task_mask_lm", "task_matched", "task_obj_predict", "task_qa", "visual_feat_loss", "visual_attr_loss"]
)
def test_task_switches_match_transformers(disabled):
    config = small_config("tiny", **{disabled: False})
    hf, ours = paired(transformers.LxmertForPreTraining, lxmert_fast.LxmertForPreTraining, config, train=True)
    batch = make_batch(config, seed=2)
    torch.testing.assert_close(ours(**batch).loss, hf(**batch).loss, atol=ATOL, rtol=0)


def test_lm_head_at_labels_only_gives_the_same_loss_and_gradients():
    config = small_config()
    _, ours = paired(transformers.LxmertForPreTraining, lxmert_fast.LxmertForPreTraining, config, train=True)
    batch = make_batch(config, seed=3)
    full = ours(**batch)
    full.loss.backward()
    full_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    sparse = ours(**batch, lm_logits_at_labels_only=True)
    assert sparse.prediction_logits is None
    torch.testing.assert_close(sparse.loss, full.loss, atol=ATOL, rtol=0)
    sparse.loss.backward()
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], atol=ATOL, rtol=1e-4, msg=name)


def test_true_first_is_a_stable_partition():
    from lxmert_fast.model.modeling import true_first

    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 5120):
        flags = torch.rand(n, generator=g) < 0.3
        expected = torch.argsort((~flags).to(torch.int32), stable=True)
        for count in sorted({0, 1, int(flags.sum()), n}):
            assert torch.equal(true_first(flags, count), expected[:count])
    assert torch.equal(true_first(torch.tensor([False, True, False, True]), 3), torch.tensor([1, 3, 0]))


def test_tuple_outputs_match_transformers():
    config = small_config()
    hf, ours = paired(transformers.LxmertForPreTraining, lxmert_fast.LxmertForPreTraining, config)
    batch = make_batch(config, padded=False)
    kwargs = dict(return_dict=False, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        expected, actual = hf(**batch, **kwargs), ours(**batch, **kwargs)
    assert len(expected) == len(actual)
    torch.testing.assert_close(actual[0], expected[0], atol=ATOL, rtol=0)  # the loss comes first
    for e, a in zip(expected[1:4], actual[1:4], strict=True):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=0)
    for e, a in zip(expected[4:], actual[4:], strict=True):  # hidden states and attentions, as tuples
        assert len(e) == len(a)
        for x, y in zip(e, a, strict=True):
            torch.testing.assert_close(y, x, atol=ATOL, rtol=0)


def test_question_answering_equals_transformers():
    config = small_config()
    hf, ours = paired(transformers.LxmertForQuestionAnswering, lxmert_fast.LxmertForQuestionAnswering, config, True)
    batch = model_inputs(make_batch(config, seed=4))
    labels = torch.tensor([3, 0, 10])
    expected, actual = hf(**batch, labels=labels), ours(**batch, labels=labels)
    torch.testing.assert_close(actual.question_answering_score, expected.question_answering_score, atol=ATOL, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=ATOL, rtol=0)
    expected.loss.backward()
    actual.loss.backward()
    ours_params = dict(ours.named_parameters())
    for name, param in hf.named_parameters():
        torch.testing.assert_close(ours_params[name].grad, param.grad, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "hf_class, our_class",
    [
        (transformers.LxmertModel, lxmert_fast.LxmertModel),
        (transformers.LxmertForPreTraining, lxmert_fast.LxmertForPreTraining),
        (transformers.LxmertForQuestionAnswering, lxmert_fast.LxmertForQuestionAnswering),
    ],
)
def test_state_dict_keys_and_shapes_equal_transformers(hf_class, our_class):
    config = small_config()
    hf, ours = hf_class(config), our_class(config)
    assert {k: v.shape for k, v in hf.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    hf.load_state_dict(ours.state_dict(), strict=True)  # and back


def test_full_size_config_equals_transformers():
    """The paper's base model (228M parameters with all heads): forward, loss and a sample of gradients."""
    config = transformers.LxmertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf, ours = paired(transformers.LxmertForPreTraining, lxmert_fast.LxmertForPreTraining, config, train=True)
    assert 225e6 < ours.num_parameters() < 232e6
    batch = make_batch(config, batch=2, text_len=20, objects=36, seed=5)
    expected, actual = hf(**batch), ours(**batch)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-4, rtol=1e-5)
    expected.loss.backward()
    actual.loss.backward()
    ours_params = dict(ours.named_parameters())
    for name in (
        "lxmert.embeddings.word_embeddings.weight",
        "lxmert.encoder.layer.0.attention.self.query.weight",
        "lxmert.encoder.x_layers.4.visual_attention.att.key.weight",
        "answer_head.logit_fc.3.weight",
    ):
        torch.testing.assert_close(ours_params[name].grad, dict(hf.named_parameters())[name].grad, atol=1e-5, rtol=1e-3)


def test_nlvr2_encodes_each_image_with_the_sentence_and_concatenates():
    config = small_config()
    torch.manual_seed(0)
    model = lxmert_fast.LxmertForNLVR2(config, backend="torch").eval()
    g = torch.Generator().manual_seed(0)
    batch, text_len, objects = 2, 7, 5
    input_ids = torch.randint(1, config.vocab_size, (batch, text_len), generator=g)
    feats = torch.randn(batch, 2, objects, config.visual_feat_dim, generator=g)
    pos = torch.rand(batch, 2, objects, 4, generator=g)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        out = model(input_ids=input_ids, visual_feats=feats, visual_pos=pos, labels=labels)
        pooled = [
            model.lxmert(input_ids=input_ids, visual_feats=feats[:, i], visual_pos=pos[:, i]).pooled_output
            for i in range(2)
        ]
        expected = model.logit_fc(torch.cat(pooled, dim=-1))
    assert out.logits.shape == (batch, 2)
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, labels), atol=ATOL, rtol=0)
    assert model.logit_fc[0].in_features == 2 * config.hidden_size
    with pytest.raises(ValueError, match="batch, 2, objects"):
        model(input_ids=input_ids, visual_feats=feats[:, 0], visual_pos=pos[:, 0])


def test_accepts_both_config_classes():
    hf_config = small_config()
    ours = lxmert_fast.LxmertModel(hf_config)
    assert ours.config is hf_config  # kept as given, as transformers' models keep theirs
    assert lxmert_fast.LxmertModel(lxmert_fast.LxmertConfig(**small_config().to_dict())).config.l_layers == 3


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"  # eager: the kernels lose to launch overhead
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_backend("auto", torch.device("cuda")) == "triton"  # traced by torch.compile
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend"):
        lxmert_fast.LxmertModel(small_config(), backend="cuda")
    model = lxmert_fast.LxmertForPreTraining(small_config(), backend="auto")
    model.backend = "torch"
    assert model.lxmert.backend == "torch" and model.lxmert.encoder.visn_fc.backend == "torch"


def test_backend_comes_from_the_environment_once_at_construction(monkeypatch):
    """LXMERT_FAST_BACKEND is read when the model is built; changing it later changes nothing, and a forward
    stores nothing on the modules to pick the backend."""
    monkeypatch.setenv("LXMERT_FAST_BACKEND", "torch")
    model = lxmert_fast.LxmertForQuestionAnswering(small_config())
    assert model.backend == "torch" and model.lxmert.backend == "torch"
    fused = [module for module in model.modules() if isinstance(module, FusedOps)]
    assert fused and all(module.backend == "torch" for module in fused)
    monkeypatch.setenv("LXMERT_FAST_BACKEND", "triton")
    before = {name: dict(vars(module)) for name, module in model.named_modules()}
    with torch.no_grad():
        model(**model_inputs(make_batch(model.config)))
    assert {name: dict(vars(module)) for name, module in model.named_modules()} == before
    assert lxmert_fast.LxmertModel(small_config(), backend="torch").backend == "torch"  # an argument wins
    monkeypatch.setenv("LXMERT_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="LXMERT_FAST_BACKEND='fast'"):
        lxmert_fast.LxmertModel(small_config())


def test_wrong_shapes_give_clear_errors():
    config = small_config()
    model = lxmert_fast.LxmertModel(config)
    batch = model_inputs(make_batch(config))
    with pytest.raises(ValueError, match="visual_feats must be"):
        model(**{**batch, "visual_feats": batch["visual_feats"][..., :5]})
    with pytest.raises(ValueError, match="visual_pos must be"):
        model(**{**batch, "visual_pos": batch["visual_pos"][:, :2]})
    with pytest.raises(ValueError, match="does not match the visual batch"):
        model(**{**batch, "input_ids": batch["input_ids"][:1], "attention_mask": None, "token_type_ids": None})
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(**{**batch, "attention_mask": batch["attention_mask"][:, :3]})


def test_a_batch_without_masked_words_or_questions_gives_zero_not_nan():
    """transformers' mean over zero labelled rows is NaN; ours is 0 for that task, and the total stays finite."""
    config = small_config()
    model = lxmert_fast.LxmertForPreTraining(config, backend="torch").train()
    batch = make_batch(config, seed=6)
    batch["labels"].fill_(-100)
    batch["ans"].fill_(-100)
    for sparse in (False, True):
        out = model(**batch, return_task_losses=True, lm_logits_at_labels_only=sparse)
        assert out.task_losses["mlm"].item() == 0.0 and out.task_losses["qa"].item() == 0.0
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cpu_dropout_drops_p_scales_the_rest_and_follows_the_seed():
    """The model's CPU dropout (uniform floats, not bernoulli_) is still dropout: a fraction p zeroed, the rest
    scaled by 1/(1-p) forward and backward, fixed by torch.manual_seed, identity in eval mode."""
    from lxmert_fast.model.modeling import Dropout

    p, n = 0.1, 400_000
    dropout = Dropout(p).train()
    x = torch.full((n,), 2.0, requires_grad=True)
    torch.manual_seed(3)
    out = dropout(x)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5, dropped  # five standard deviations
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 2.0 / (1 - p)))
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() / (1 - p))
    torch.manual_seed(3)
    assert torch.equal(dropout(x), out)
    assert not torch.equal(dropout(x), out)  # the next call draws a new mask
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert (Dropout(1.0).train()(x) == 0).all()


def test_training_mode_dropout_matches_transformers_in_expectation():
    """With dropout on, ours and transformers' draw different masks, but averaged over many masks the outputs agree
    to within the sampling noise (two transformers averages with different seeds). A wrong keep-probability, scale
    or dropout site shows here: p=0.2 in place of 0.3 gives 2.5x the noise."""
    config = small_config(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    hf, ours = paired(transformers.LxmertModel, lxmert_fast.LxmertModel, config, train=True)
    batch = model_inputs(make_batch(config))
    keep = batch["attention_mask"].bool()

    def mean_output(model, seed, samples=600):
        torch.manual_seed(seed)
        with torch.no_grad():
            return torch.stack([model(**batch).language_output[keep] for _ in range(samples)]).mean(0)

    hf_mean = mean_output(hf, seed=0)
    noise = (hf_mean - mean_output(hf, seed=1)).abs().mean()
    gap = (hf_mean - mean_output(ours, seed=2)).abs().mean()
    assert gap < 1.5 * noise, f"ours differs from transformers by {gap:.4f} on average, sampling noise {noise:.4f}"
