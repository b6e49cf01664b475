"""The fused Triton ops of LXMERT: ``from lxmert_fast.kernels.ops import add_layernorm, ...``.

Each op lives in its own file with its pure-PyTorch ``*_ref``, its forward/backward kernels and its custom-op
registration (namespace ``lxmert_fast``), so ``torch.compile`` and CUDA graphs see the kernels.
"""

from .add_layernorm import add_layernorm, add_layernorm_dropout_mask, add_layernorm_ref
from .cross_attention import bidirectional_cross_attention, bidirectional_cross_attention_ref
from .roi_embedding import roi_position_embedding, roi_position_embedding_ref

__all__ = [
    "add_layernorm",
    "add_layernorm_dropout_mask",
    "add_layernorm_ref",
    "bidirectional_cross_attention",
    "bidirectional_cross_attention_ref",
    "roi_position_embedding",
    "roi_position_embedding_ref",
]
