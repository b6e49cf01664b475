"""The generator of each item, ``np.random.default_rng([seed, epoch, index])``, for a whole batch at once.

default_rng hashes its seed through a SeedSequence and seeds a PCG64 with the result: about 8 us an item, a tenth of
a DataLoader worker's time per sample. The hashing is a few 32-bit multiplications and shifts whose constants do not
depend on the data, so here it runs over all the batch's (seed, epoch, index) rows at once in numpy, and the PCG64
seeding (two 128-bit steps) in Python integers; one Generator is then set to each item's state in turn. The streams
are exactly default_rng's (numpy's bit_generator.pyx: SeedSequence.mix_entropy and generate_state, pcg64.c:
pcg64_set_seed; tests/test_item_rng.py compares the states and draws). A seed, epoch or index outside [0, 2**32)
is hashed as more than one word: then each item's generator is default_rng's own.

Public API
    item_generators(seed, keys) -> iterator of np.random.Generator   for each (epoch, index) of ``keys``, in order;
                                   the same object each time, so draw from one before asking for the next
"""

from __future__ import annotations

import numpy as np

_MASK = 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16
_POOL = 4
_PCG_MULT = (2549297995355413924 << 64) | 4865540595714422341
_MASK128 = (1 << 128) - 1


class _Hash:
    """SeedSequence's hashmix, over a column of uint32 values kept in uint64 (products wrap at 2**64, a multiple
    of 2**32, so masking gives the uint32 result)."""

    def __init__(self, const):
        self.const = const

    def __call__(self, value, mult):
        value = value ^ self.const
        self.const = (self.const * mult) & _MASK
        value = (value * np.uint64(self.const)) & np.uint64(_MASK)
        return value ^ (value >> np.uint64(_XSHIFT))


def _mix(x, y):
    result = (np.uint64(_MIX_MULT_L) * x - np.uint64(_MIX_MULT_R) * y) & np.uint64(_MASK)
    return result ^ (result >> np.uint64(_XSHIFT))


def _seed_words(entropy: np.ndarray) -> np.ndarray:
    """(n, 3) uint32-valued entropy rows -> (n, 4) Python-int-ready uint64: SeedSequence(row).generate_state(4,
    np.uint64) of each row."""
    hashmix = _Hash(_INIT_A)
    columns = [entropy[:, i] for i in range(entropy.shape[1])]
    pool = [hashmix(columns[i] if i < len(columns) else np.zeros_like(columns[0]), _MULT_A) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = _mix(pool[dst], hashmix(pool[src], _MULT_A))
    out = _Hash(_INIT_B)
    words = [out(pool[i % _POOL], _MULT_B) for i in range(2 * _POOL)]  # 8 uint32 words: 4 little-endian uint64
    return np.stack([words[2 * j] | (words[2 * j + 1] << np.uint64(32)) for j in range(_POOL)], axis=1)


def _pcg64_state(words) -> dict:
    """pcg64_set_seed: the first two words are the 128-bit seed, the last two the stream (high word first)."""
    seed = (int(words[0]) << 64) | int(words[1])
    inc = ((((int(words[2]) << 64) | int(words[3])) << 1) | 1) & _MASK128
    state = (inc + seed) & _MASK128  # the first step from state 0 gives inc
    state = (state * _PCG_MULT + inc) & _MASK128
    return {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0}


def item_generators(seed: int, keys):
    """For each (epoch, index) of ``keys``: a Generator drawing exactly what default_rng([seed, epoch, index])
    would (the same object, reset each time)."""
    keys = [(int(epoch), int(index)) for epoch, index in keys]
    values = [(int(seed), epoch, index) for epoch, index in keys]
    if not values or any(not 0 <= v <= _MASK for row in values for v in row):
        yield from (np.random.default_rng(list(row)) for row in values)  # its own checks and errors
        return
    bit_generator = np.random.PCG64()
    generator = np.random.Generator(bit_generator)
    for words in _seed_words(np.asarray(values, dtype=np.uint64)).tolist():
        bit_generator.state = _pcg64_state(words)
        yield generator


__all__ = ["item_generators"]
