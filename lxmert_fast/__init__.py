"""lxmert_fast: a fast, faithful LXMERT.

    from lxmert_fast import LxmertConfig, LxmertModel, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertForNLVR2

The classes are drop-ins for transformers' classes of the same names (same config, forward keywords, outputs and
parameter names) with a `backend` switch between plain PyTorch and the fused Triton kernels.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lxmert_fast.model.configuration import LxmertConfig
    from lxmert_fast.model.modeling import (
        LxmertForNLVR2,
        LxmertForPreTraining,
        LxmertForQuestionAnswering,
        LxmertModel,
        LxmertPreTrainedModel,
    )

__version__ = "0.1.0"


def _subpackages_from_the_checkout(*names):
    """``lxmert_fast.kernels`` and ``lxmert_fast.configs`` are the top-level folders ``kernels/`` and ``configs/``.
    A wheel holds copies inside the package (setup.py's ``package_dir``); a checkout, and an editable install of
    one, has them only at the top level: there they are made namespace packages over those folders, which also
    keeps the top-level ``kernels/`` from ever being imported as a package of its own name."""
    package = Path(__file__).resolve().parent
    for name in names:
        folder = package.parent / name
        if (package / name).is_dir() or not folder.is_dir() or f"{__name__}.{name}" in sys.modules:
            continue
        spec = importlib.machinery.ModuleSpec(f"{__name__}.{name}", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        globals()[name] = module


_subpackages_from_the_checkout("kernels", "configs")

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
        from lxmert_fast.model.configuration import LxmertConfig

        return LxmertConfig
    if name in __all__:
        from lxmert_fast.model import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'lxmert_fast' has no attribute {name!r}")
