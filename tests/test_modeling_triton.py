"""backend="triton" equals backend="torch": outputs, losses, gradients, and a short training run.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py), so the model is tiny; on a GPU the same
tests run the compiled kernels.
"""

import pytest
import torch
from helpers import make_batch, small_config

import lxmert_fast
from lxmert_fast.data import to_device
from lxmert_fast.model.static_shapes import StaticShapes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def twin_models(config, **kwargs):
    torch.manual_seed(0)
    reference = lxmert_fast.LxmertForPreTraining(config, backend="torch").to(DEVICE)
    fused = lxmert_fast.LxmertForPreTraining(config, backend="triton").to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


@pytest.mark.parametrize("name", ["tiny", "uneven"])
def test_triton_backend_equals_torch_backend(name):
    config = small_config(name)
    reference, fused = twin_models(config)
    reference.train()
    fused.train()  # dropout is off in these configs: train mode checks the training code paths
    batch = to_device(make_batch(config, batch=2, text_len=7, objects=5, seed=1), DEVICE)
    expected = reference(**batch, return_task_losses=True)
    actual = fused(**batch, return_task_losses=True)
    for task, value in expected.task_losses.items():
        torch.testing.assert_close(actual.task_losses[task], value, atol=1e-5, rtol=1e-5, msg=task)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(actual.prediction_logits[keep], expected.prediction_logits[keep], atol=1e-5, rtol=1e-5)
    expected.loss.backward()
    actual.loss.backward()
    fused_params = dict(fused.named_parameters())
    for param_name, param in reference.named_parameters():
        torch.testing.assert_close(fused_params[param_name].grad, param.grad, atol=2e-5, rtol=1e-4, msg=param_name)


def test_triton_backend_with_static_shapes_equals_torch_backend():
    """The kernels on text packed to a fixed number of rows and the LM head on fixed rows (the static-shape path of
    torch.compile and CUDA graphs, run eagerly) give the eager torch path's losses and gradients."""
    config = small_config("uneven")
    reference, fused = twin_models(config)
    reference.train()
    fused.train()
    batch = to_device(make_batch(config, batch=3, text_len=7, objects=5, seed=2), DEVICE)
    real, labelled = int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum())
    expected = reference(**batch, return_task_losses=True)
    expected.loss.backward()
    actual = fused(**batch, return_task_losses=True, lm_logits_at_labels_only=True,
                   static_shapes=StaticShapes(text_rows=real + 3, lm_label_rows=labelled + 2))
    for task, value in expected.task_losses.items():
        torch.testing.assert_close(actual.task_losses[task], value, atol=1e-5, rtol=1e-5, msg=task)
    actual.loss.backward()
    fused_params = dict(fused.named_parameters())
    for param_name, param in reference.named_parameters():
        torch.testing.assert_close(fused_params[param_name].grad, param.grad, atol=2e-5, rtol=1e-4, msg=param_name)


def test_triton_backend_trains_like_torch_backend():
    """The same short training run, with and without the kernels, follows the same loss curve."""
    config = small_config("tiny")
    batch = to_device(make_batch(config, batch=2, text_len=6, objects=4, seed=100), DEVICE)
    curves = []
    for model in twin_models(config):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curve = []
        for _ in range(6):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    reference, fused = curves
    assert reference[-1] < reference[0]  # it learns
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), atol=1e-3, rtol=1e-3)


def test_triton_backend_dropout_draws_fresh_masks_each_call():
    """With dropout on, two training-mode calls differ (each kernel launch takes a new seed) and stay finite."""
    config = small_config("tiny", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    _, fused = twin_models(config)
    batch = to_device(make_batch(config, batch=2, text_len=6, objects=4, targets=False), DEVICE)
    fused.train()
    with torch.no_grad():
        first = fused(**batch).cross_relationship_score
        second = fused(**batch).cross_relationship_score
    assert not torch.allclose(first, second)
    assert torch.isfinite(first).all()


def test_triton_backend_under_autocast_matches_torch_backend():
    """Mixed precision: the fused path keeps the residual stream in the autocast dtype; within half precision's
    error of the torch path."""
    config = small_config("tiny")
    reference, fused = twin_models(config)
    batch = to_device(make_batch(config, batch=2, text_len=6, objects=4, seed=7), DEVICE)
    half = torch.float16 if DEVICE == "cuda" else torch.bfloat16
    with torch.autocast(DEVICE, dtype=half):
        expected = reference(**batch, return_task_losses=True)
        actual = fused(**batch, return_task_losses=True)
    assert torch.isfinite(actual.loss)
    torch.testing.assert_close(actual.loss.float(), expected.loss.float(), atol=0.1, rtol=0.02)
    actual.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)
