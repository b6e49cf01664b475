"""Shared test set-up.

Without CUDA, Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be set before any kernel is
defined, so it is set here, before test modules import lxmert_fast.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
