"""The FLOP counter against the known per-sample figures (35.4 and "about 32" GFLOP) and against how the count must
scale."""

import math

import pytest

from lxmert_fast.model.configuration import LxmertConfig
from lxmert_fast.model.flops import (
    PAPER_SAMPLES_PER_S,
    count_flops,
    mfu,
    paper_schedule_hours,
    pretraining_flops_per_sample,
)

BASE = LxmertConfig()


def test_spec_figure_lm_head_at_all_tokens():
    assert pretraining_flops_per_sample(BASE, 20, 36, lm_head="all") / 1e9 == pytest.approx(35.4, rel=0.02)


def test_spec_figure_lm_head_at_masked_tokens():
    # The exact count is 32.9 GFLOP, often rounded to "about 32".
    gflop = pretraining_flops_per_sample(BASE, 20, 36, lm_head="masked") / 1e9
    assert gflop == pytest.approx(32.9, rel=0.01)
    assert gflop == pytest.approx(32, rel=0.03)


def test_lm_head_difference_is_the_unmasked_tokens():
    per_token = count_flops(BASE, lm_tokens=1).forward["lm_head"] * 3  # fwd + 2x bwd
    full = pretraining_flops_per_sample(BASE, lm_head="all")
    masked = pretraining_flops_per_sample(BASE, lm_head="masked")
    assert full - masked == pytest.approx(17 * per_token)
    assert per_token == pytest.approx(6 * 768 * (768 + 30522))


def test_backward_is_twice_forward_except_visual_input_projection():
    c = count_flops(BASE)
    for name, fwd in c.forward.items():
        expected = 1.0 if name == "visual_embedding" else 2.0
        assert c.backward[name] == pytest.approx(expected * fwd), name
    assert c.forward["visual_embedding"] == pytest.approx(2 * 36 * (2048 + 4) * 768)


def test_one_language_layer_by_hand():
    one = LxmertConfig(l_layers=1)
    two = LxmertConfig(l_layers=2)
    layer = count_flops(two).forward["language_layers"] - count_flops(one).forward["language_layers"]
    n, h = 20, 768
    assert layer == pytest.approx(2 * (n * 12 * h * h + 2 * n * n * h))


@pytest.mark.parametrize("part,field", [("language_layers", "l_layers"), ("relationship_layers", "r_layers"),
                                        ("cross_layers", "x_layers")])
def test_encoder_cost_is_linear_in_depth(part, field):
    c3 = count_flops(LxmertConfig(**{field: 3})).forward[part]
    c6 = count_flops(LxmertConfig(**{field: 6})).forward[part]
    assert c6 == pytest.approx(2 * c3)


def test_scaling_with_lengths_and_width():
    # Linear parts grow with the token count, attention quadratically: doubling the text more than doubles
    # the language encoder but less than quadruples it.
    a = count_flops(BASE, text_len=20).forward["language_layers"]
    b = count_flops(BASE, text_len=40).forward["language_layers"]
    assert 2 * a < b < 4 * a
    # More objects cost more everywhere they appear; the language encoder does not see them.
    few, many = count_flops(BASE, num_objects=10), count_flops(BASE, num_objects=36)
    assert few.forward["language_layers"] == many.forward["language_layers"]
    for part in ("visual_embedding", "relationship_layers", "cross_layers", "object_head"):
        assert few.forward[part] < many.forward[part]
    # Heads do not change the FLOPs of a product; width does, quadratically in the encoder.
    assert count_flops(LxmertConfig(num_attention_heads=8)).total == pytest.approx(count_flops(BASE).total)
    wide = count_flops(LxmertConfig(hidden_size=1536, intermediate_size=6144)).forward["relationship_layers"]
    assert 3.5 * many.forward["relationship_layers"] < wide < 4 * many.forward["relationship_layers"]


def test_disabled_heads_cost_nothing():
    c = count_flops(LxmertConfig(task_qa=False, task_mask_lm=False, task_obj_predict=False, task_matched=False))
    assert set(c.forward) == {"visual_embedding", "language_layers", "relationship_layers", "cross_layers", "pooler"}


def test_mfu_and_paper_projection():
    assert PAPER_SAMPLES_PER_S == pytest.approx(198.5, abs=0.05)
    assert paper_schedule_hours(PAPER_SAMPLES_PER_S) == pytest.approx(240.0)
    assert mfu(1000.0, 35.4e9, 989.4e12) == pytest.approx(1000 * 35.4e9 / 989.4e12)
    assert math.isfinite(mfu(1.0, 1.0, 1.0))


def test_rejects_unknown_lm_head_mode():
    with pytest.raises(ValueError):
        pretraining_flops_per_sample(BASE, lm_head="some")
