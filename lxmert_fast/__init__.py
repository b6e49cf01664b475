"""lxmert_fast: a fast, faithful LXMERT.

    from lxmert_fast import LxmertConfig, LxmertModel, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertForNLVR2

The classes are drop-ins for transformers' classes of the same names (same config, forward keywords, outputs and
parameter names) with a `backend` switch between plain PyTorch and the fused Triton kernels.
"""

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
