"""Static shapes (lxmert_fast.model.static_shapes): the row counts of a compiled or graphed step, passed explicitly.

For every batch that fits, the model gives the same outputs, losses and gradients with static shapes as without
(the exact, data-dependent path), eagerly and under torch.compile; whether a batch fits is asked on the host.
"""

import torch
import transformers
from helpers import make_batch, small_config

import lxmert_fast
from lxmert_fast.model.static_shapes import StaticShapes

ATOL = 1e-5


def paired(config):
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(config)
    ours = lxmert_fast.LxmertForPreTraining(config, backend="torch")
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_text_packed_to_static_rows_gives_the_unpacked_outputs_loss_and_gradients():
    """The text packed to a fixed number of rows, real tokens first and padded positions as filler: the real
    tokens' outputs, the loss and every gradient are those of the model without packing."""
    config = small_config()
    model = lxmert_fast.LxmertForPreTraining(config, backend="torch").train()
    batch = make_batch(config, batch=4, seed=7)
    real = int(batch["attention_mask"].sum())  # 21 of 36 positions
    mask = batch["attention_mask"].bool()
    unpacked = lxmert_fast.LxmertForPreTraining(config, backend="torch").train()
    unpacked.lxmert.pack_text = False
    unpacked.load_state_dict(model.state_dict())
    ref = unpacked(**batch, return_task_losses=True, output_hidden_states=True)
    ref.loss.backward()
    ref_grads = _grads(unpacked)
    for rows in (real, real + 7, 36, 100, None):  # exactly enough, filler rows, every position, more, no packing
        model.zero_grad()
        out = model(**batch, return_task_losses=True, output_hidden_states=True,
                    static_shapes=StaticShapes(text_rows=rows))
        torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)
        lang, ref_lang = out.language_hidden_states[-1], ref.language_hidden_states[-1]
        torch.testing.assert_close(lang[mask], ref_lang[mask], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.vision_hidden_states[-1], ref.vision_hidden_states[-1], atol=ATOL, rtol=0)
        out.loss.backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)


def test_lm_head_on_static_rows_gives_the_same_loss_and_gradients():
    """The LM head on a fixed number of rows, labelled tokens first: the loss and every gradient are those of the
    head at every token; without a row count (None) it runs on every token and returns the logits."""
    config = small_config()
    ours = paired(config)
    batch = make_batch(config, batch=4, seed=4)
    batch["labels"][1, 3:6] = torch.tensor([5, 6, 7])  # not only the first tokens: all must be picked
    labelled = int((batch["labels"] != -100).sum())
    full = ours(**batch, return_task_losses=True)
    full.loss.backward()
    full_grads = _grads(ours)
    for rows in (labelled, labelled + 5, 10_000):  # exactly enough, filler rows, more rows than tokens
        ours.zero_grad()
        out = ours(**batch, return_task_losses=True, lm_logits_at_labels_only=True,
                   static_shapes=StaticShapes(lm_label_rows=rows))
        assert out.prediction_logits is None
        torch.testing.assert_close(out.task_losses["mlm"], full.task_losses["mlm"], atol=ATOL, rtol=0)
        out.loss.backward()
        for name, param in ours.named_parameters():
            torch.testing.assert_close(param.grad, full_grads[name], atol=ATOL, rtol=1e-4, msg=name)
    out = ours(**batch, return_task_losses=True, lm_logits_at_labels_only=True, static_shapes=StaticShapes())
    assert out.prediction_logits is not None
    torch.testing.assert_close(out.task_losses["mlm"], full.task_losses["mlm"], atol=ATOL, rtol=0)


def test_the_same_result_eagerly_compiled_and_without_static_shapes():
    """torch.compile (Inductor, on the CPU, fullgraph: no eager fallback inside) traces the static-shape path and
    gives what it gives eagerly, which is what the exact data-dependent path gives."""
    config = small_config("tiny")
    ours = paired(config)
    batch = make_batch(config, batch=2, text_len=6, objects=3, seed=5)  # 9 real text tokens of 12, 3 labelled
    shapes = StaticShapes(text_rows=10, lm_label_rows=4)
    assert shapes.fits(batch)
    results = {}
    torch._dynamo.reset()
    for name, forward, static in (("exact", ours, None), ("eager", ours, shapes),
                                  ("compiled", torch.compile(ours, fullgraph=True), shapes)):
        ours.zero_grad()
        out = forward(**batch, return_task_losses=True, lm_logits_at_labels_only=True, static_shapes=static)
        out.loss.backward()
        results[name] = (out.task_losses, _grads(ours))
    torch._dynamo.reset()
    for name in ("eager", "compiled"):
        losses, grads = results[name]
        for task, value in results["exact"][0].items():
            torch.testing.assert_close(losses[task], value, atol=ATOL, rtol=0, msg=f"{name} {task}")
        for param, grad in results["exact"][1].items():
            torch.testing.assert_close(grads[param], grad, atol=ATOL, rtol=1e-4, msg=f"{name} {param}")


def test_rows_from_the_data_statistics():
    shapes = StaticShapes.from_statistics(256, 20, mean_length=13.0, std_length=3.0, mask_rate=0.15)
    # text: 256 x 13 + 10 x 16 x 3 = 3,808, rounded up to 64 rows; LM: 768 expected + 10 standard deviations (255)
    assert shapes == StaticShapes(text_rows=3840, lm_label_rows=1024)
    assert StaticShapes.from_statistics(2, 9, mean_length=8.0, std_length=1.0) == StaticShapes(18, None)  # at most all


def test_fits_is_asked_on_the_host_and_says_why_not():
    shapes = StaticShapes(text_rows=3840, lm_label_rows=1024)
    mask, labels = torch.zeros(256, 20, dtype=torch.long), torch.full((256, 20), -100)
    mask[:, :13], labels[:, 1:4] = 1, 7  # 3,328 real tokens, 768 labelled
    assert shapes.fits({"attention_mask": mask, "labels": labels})
    mask[:, :16] = 1  # 4,096 real tokens
    assert not shapes.fits({"attention_mask": mask})
    assert shapes.why_not({"attention_mask": mask}) == "4096 real text tokens, more than the 3840 static text rows"
    labels[:, 4:8] = 7  # 1,792 labelled
    assert shapes.why_not({"labels": labels}) == "1792 masked tokens, more than the 1024 static LM-head rows"
    assert StaticShapes().fits({"attention_mask": mask, "labels": labels})  # every position always fits


def test_nlvr2_gives_its_two_passes_twice_the_text_rows():
    config = small_config()
    model = lxmert_fast.LxmertForNLVR2(config, backend="torch").eval()
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # 11 real tokens, encoded once per image: 22
    inputs = dict(input_ids=torch.randint(1, config.vocab_size, (2, 7), generator=g), attention_mask=mask,
                  visual_feats=torch.randn(2, 2, 5, config.visual_feat_dim, generator=g),
                  visual_pos=torch.rand(2, 2, 5, 4, generator=g))
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = model(**inputs, static_shapes=StaticShapes(text_rows=11)).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    assert StaticShapes(text_rows=11).fits(inputs) and not StaticShapes(text_rows=10).fits(inputs)
