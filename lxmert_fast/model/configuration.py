"""LxmertConfig: transformers' config class, so config.json files are interchangeable both ways."""

from transformers import LxmertConfig as _HFLxmertConfig


class LxmertConfig(_HFLxmertConfig):
    """Same fields and defaults as ``transformers.LxmertConfig`` (the paper's base model)."""
