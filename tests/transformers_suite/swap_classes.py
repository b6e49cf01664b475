"""pytest plugin: put lxmert_fast's classes where transformers' LXMERT test module imports them from.

Loaded with ``-p swap_classes`` (see run.sh), before the test module is collected, it replaces ``LxmertConfig``,
``LxmertModel``, ``LxmertForPreTraining`` and ``LxmertForQuestionAnswering`` in ``transformers`` by ours and
registers ours in the auto-class mappings (the test module looks the task models up there to choose the labels).

transformers' ``tests/test_pipeline_mixin.py`` re-imports transformers from the checkout's ``src/`` and puts that
copy in ``sys.modules["transformers"]``, which the test module's later imports then read: so that module is imported
here first, and both copies get our classes.
"""

import importlib
import sys

import transformers

import lxmert_fast

SWAPPED = ("LxmertConfig", "LxmertModel", "LxmertForPreTraining", "LxmertForQuestionAnswering")
AUTO_CLASSES = {
    "AutoModel": "LxmertModel",
    "AutoModelForPreTraining": "LxmertForPreTraining",
    "AutoModelForQuestionAnswering": "LxmertForQuestionAnswering",
}


def swap(module):
    for name in SWAPPED:
        setattr(module, name, getattr(lxmert_fast, name))
    for auto, model in AUTO_CLASSES.items():
        getattr(module, auto).register(lxmert_fast.LxmertConfig, getattr(lxmert_fast, model), exist_ok=True)


def pytest_configure(config):
    swap(transformers)
    importlib.import_module("tests.test_pipeline_mixin")  # may replace sys.modules["transformers"]
    if sys.modules["transformers"] is not transformers:
        swap(sys.modules["transformers"])
