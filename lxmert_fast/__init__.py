"""lxmert_fast: a fast, faithful LXMERT.

    from lxmert_fast import LxmertConfig, LxmertModel, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertForNLVR2

The classes are drop-ins for transformers' classes of the same names (same config, forward keywords, outputs and
parameter names) with a `backend` switch between plain PyTorch and the fused Triton kernels.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lxmert_fast.configuration import LxmertConfig
    from lxmert_fast.modeling import (
        LxmertForNLVR2,
        LxmertForPreTraining,
        LxmertForQuestionAnswering,
        LxmertModel,
        LxmertPreTrainedModel,
    )

__version__ = "0.1.0"

__all__ = [
    "LxmertConfig",
    "LxmertForNLVR2",
    "LxmertForPreTraining",
    "LxmertForQuestionAnswering",
    "LxmertModel",
    "LxmertPreTrainedModel",
]


def __getattr__(name):
    # imported on first use: the commands' --help and their flag checks answer before torch and transformers load
    if name == "LxmertConfig":
        from lxmert_fast.configuration import LxmertConfig

        return LxmertConfig
    if name in __all__:
        from lxmert_fast import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'lxmert_fast' has no attribute {name!r}")
