"""A batch's item generators (lxmert_fast.data.item_rng) are default_rng([seed, epoch, index]) exactly: the same
PCG64 state and the same draws, and default_rng itself where a value does not fit one 32-bit word."""

import numpy as np
import pytest

from lxmert_fast.data.item_rng import item_generators


@pytest.mark.parametrize("seed", [0, 1, 9595, 2**31 + 7, 2**32 - 1])
def test_states_and_draws_are_those_of_default_rng(seed):
    rng = np.random.default_rng(seed)
    drawn = zip(rng.integers(0, 40, 60).tolist(), rng.integers(0, 2**32, 60).tolist(), strict=True)
    keys = [(0, 0), (0, 2**32 - 1), (19, 9_180_000), *drawn]
    for (epoch, index), generator in zip(keys, item_generators(seed, keys), strict=True):
        expected = np.random.default_rng([seed, epoch, index])
        assert generator.bit_generator.state == expected.bit_generator.state, (seed, epoch, index)
        assert np.array_equal(generator.random(36), expected.random(36))
        assert np.array_equal(generator.integers(30522, size=18), expected.integers(30522, size=18))


def test_values_beyond_one_word_fall_back_to_default_rng():
    keys = [(0, 5), (1, 2**40)]
    for (epoch, index), generator in zip(keys, item_generators(2**33, keys), strict=True):
        assert generator.random() == np.random.default_rng([2**33, epoch, index]).random()
    with pytest.raises(ValueError):  # default_rng's own error for a negative entropy
        list(item_generators(-1, [(0, 1)]))
