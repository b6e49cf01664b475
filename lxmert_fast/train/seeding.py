"""Per-step seeding and the random-number generators' state, so that a resumed run draws exactly the masks and
dropout of an uninterrupted one."""

import random

import numpy as np
import torch


def seed_step(seed, micro_step, rank_):
    """Seed every RNG from (seed, micro-step, rank) so dropout after a resume is exactly what it would have been."""
    s = (int(seed) * 1_000_003 + int(micro_step)) * 1_009 + int(rank_)
    s %= 2**63
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def rng_state():
    """Every RNG's state as tensors, tuples and numbers only, so a checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
