"""GraphedStep: a captured training step trains exactly like the eager one, draws fresh dropout masks at every replay,
and refuses batches whose shapes differ from the captured one."""

import pytest
import torch
from helpers import make_batch, small_config

import lxmert_fast
from lxmert_fast.data import to_device
from lxmert_fast.train.cuda_graphs import GraphedStep, _copy_into

CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")


def test_copy_into_names_the_mismatching_entry():
    static = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "obj_labels": {"obj": (torch.zeros(2, 3),)}}
    _copy_into(static, {"input_ids": torch.ones(2, 5, dtype=torch.long), "obj_labels": {"obj": (torch.ones(2, 3),)}},
               "batch")
    assert static["input_ids"].eq(1).all() and static["obj_labels"]["obj"][0].eq(1).all()
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] is \(2, 6\).*recorded with \(2, 5\)"):
        _copy_into(static, {**static, "input_ids": torch.ones(2, 6, dtype=torch.long)}, "batch")
    with pytest.raises(ValueError, match=r"batch\['obj_labels'\]\['obj'\]\[0\]"):
        _copy_into(static, {**static, "obj_labels": {"obj": (torch.ones(2, 3, dtype=torch.float16),)}}, "batch")
    with pytest.raises(ValueError, match="keys"):
        _copy_into(static, {"input_ids": static["input_ids"]}, "batch")


def training_step(model, optimizer):
    """Forward with every pre-training loss, backward, optimiser step; returns the loss."""

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def train(model, batches, graphed):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    step = training_step(model, optimizer)
    run = GraphedStep(step, optimizer, warmup=2) if graphed else step
    losses = []
    for batch in batches:
        if not graphed:
            optimizer.zero_grad(set_to_none=True)
        losses.append(run(batch).item())
    return losses


@gpu_only
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graphed_training_equals_eager_training(backend):
    config = small_config("uneven")
    batches = [to_device(make_batch(config, batch=4, text_len=9, objects=5, seed=s), "cuda") for s in range(6)]
    curves = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = lxmert_fast.LxmertForPreTraining(config, backend=backend).cuda().train()
        curves.append(train(model, batches, graphed))
    eager, graphed = curves
    assert eager[-1] < eager[0]
    # steps 3-6 are replays of the graph captured at step 3; padded text is not packed inside the graph
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), atol=1e-4, rtol=1e-4)


@gpu_only
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_replays_draw_new_dropout_masks(backend):
    config = small_config("tiny", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    torch.manual_seed(0)
    model = lxmert_fast.LxmertForPreTraining(config, backend=backend).cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay fixed: only the masks can change
    graphed = GraphedStep(training_step(model, optimizer), optimizer, warmup=1)
    batch = to_device(make_batch(config, batch=4, text_len=9, objects=5), "cuda")
    losses = [graphed(batch).item() for _ in range(4)]  # one eager call, then a capture and replays
    assert graphed.graph is not None
    assert len(set(losses[1:])) == 3, f"replays repeated a dropout mask: {losses}"
    assert all(torch.isfinite(torch.tensor(losses)))


@gpu_only
def test_graphed_step_refuses_a_batch_of_another_shape():
    config = small_config("tiny")
    model = lxmert_fast.LxmertForPreTraining(config, backend="torch").cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    graphed = GraphedStep(training_step(model, optimizer), optimizer, warmup=1)
    for _ in range(2):
        graphed(to_device(make_batch(config, batch=2, text_len=6, objects=4), "cuda"))
    with pytest.raises(ValueError, match="input_ids"):
        graphed(to_device(make_batch(config, batch=2, text_len=7, objects=4), "cuda"))


# ------------------------------------------------------------------ --engine torch on a GPU
def _engine_losses(config, backend, graphs, steps=6, seed_each_step=False, static=None):
    """Losses and final weights of ``steps`` steps; ``static[s]``, when given, says whether step s's batch fits
    the objective's static shapes (text packed to 24 rows, the LM head on 8 rows)."""
    from lxmert_fast.model.static_shapes import StaticShapes
    from lxmert_fast.train.objectives import PretrainingObjective
    from lxmert_fast.train.optimization import BertAdam, build_scheduler
    from lxmert_fast.train.single_device import SingleDeviceEngine

    torch.manual_seed(0)
    model = lxmert_fast.LxmertForPreTraining(config, backend=backend)
    objective = PretrainingObjective(model, StaticShapes(text_rows=24, lm_label_rows=8)).cuda().train()
    optimizer = BertAdam(objective.parameters(), lr=1e-3)
    engine = SingleDeviceEngine(objective, optimizer, build_scheduler(optimizer, steps), device="cuda",
                                precision="fp32", gradient_clipping=1.0, cuda_graphs=graphs)
    losses = []
    for s in range(steps):
        if seed_each_step:
            torch.manual_seed(1000 + s)  # as the loop's seeding.seed_step
        batch = to_device(make_batch(config, batch=4, text_len=9, objects=5, seed=s), "cuda")
        fits = True if static is None else static[s]
        losses.append(engine.forward_backward(batch, static=fits)["loss"].item())  # the loop reads it before step()
        engine.step()
    assert (engine.graphed is not None and engine.graphed.graph is not None) == graphs
    if graphs and static is not None:  # warm-ups aside, the batches that do not fit ran eagerly
        assert engine.eager_steps == static.count(False)
    return losses, [p.detach().clone() for p in objective.parameters()]


@gpu_only
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_engine_graphed_trains_like_eager(backend):
    config = small_config("uneven")
    eager, eager_weights = _engine_losses(config, backend, graphs=False)
    graphed, graphed_weights = _engine_losses(config, backend, graphs=True)
    assert eager[-1] < eager[0]
    # steps 4-6 are replays; clipping and BertAdam run eagerly after each replay, on the graph's gradients
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), atol=1e-4, rtol=1e-4)
    for a, b in zip(graphed_weights, eager_weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@gpu_only
def test_torch_engine_graph_with_static_shapes_and_an_eager_step_trains_like_eager():
    """Inside the graph the LM head runs on 8 rows (make_batch labels 5 tokens of 36) and the text is packed to 24
    rows (20 real tokens of 36). Steps 4 and 6 are marked as not fitting (as the loop marks a batch with too many
    masked words): step 4 runs eagerly instead of being captured (the graph is taken at step 5), step 6 runs
    eagerly into the graph's gradient buffers, and step 7 is a replay again. Losses and weights follow the
    all-eager run."""
    config = small_config("uneven")
    static = [True, True, True, False, True, False, True]
    eager, eager_weights = _engine_losses(config, "triton", graphs=False, steps=7, static=static)
    with pytest.warns(UserWarning, match="runs eagerly.*does not fit the static shapes"):
        graphed, graphed_weights = _engine_losses(config, "triton", graphs=True, steps=7, static=static)
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), atol=1e-4, rtol=1e-4)
    for a, b in zip(graphed_weights, eager_weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@gpu_only
def test_torch_engine_graph_replays_follow_the_per_step_seed():
    """The loop seeds every RNG before each micro-batch, so a resumed run draws the masks of an uninterrupted
    one: with dropout on, two graphed runs under the same per-step seeds give the same losses."""
    config = small_config("tiny", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    first, _ = _engine_losses(config, "triton", graphs=True, seed_each_step=True)
    second, _ = _engine_losses(config, "triton", graphs=True, seed_each_step=True)
    assert first == second
    assert all(torch.isfinite(torch.tensor(first)))


@gpu_only
def test_torch_engine_checkpoint_round_trip_on_the_gpu(tmp_path):
    """A checkpoint written on the GPU loads back into a fresh engine: weights and optimiser state on the GPU, the
    RNG states of the client state on the CPU, where torch.set_rng_state needs them."""
    from lxmert_fast.train import seeding
    from lxmert_fast.train.objectives import PretrainingObjective
    from lxmert_fast.train.optimization import BertAdam, build_scheduler
    from lxmert_fast.train.single_device import SingleDeviceEngine

    config = small_config("tiny")

    def engine():
        torch.manual_seed(0)
        objective = PretrainingObjective(lxmert_fast.LxmertForPreTraining(config, backend="torch")).cuda()
        optimizer = BertAdam(objective.parameters(), lr=1e-3)
        return SingleDeviceEngine(objective, optimizer, build_scheduler(optimizer, 10), device="cuda",
                                  precision="fp32", cuda_graphs=False)

    first = engine()
    first.forward_backward(to_device(make_batch(config, batch=2, seed=1), "cuda"))
    first.step()
    first.save(str(tmp_path), "t", client_state={"rng": seeding.rng_state()})
    second = engine()
    client = second.load(str(tmp_path), "t")
    seeding.set_rng_state(client["rng"])
    for a, b in zip(first.module.parameters(), second.module.parameters(), strict=True):
        assert b.device.type == "cuda" and torch.equal(a, b)
    state = second.optimizer.state[next(second.module.parameters())]
    assert state["exp_avg"].device.type == "cuda"
