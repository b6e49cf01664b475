"""pytest plugin: put lxmert_fast's classes where transformers' LXMERT test module imports them from.

Loaded with ``-p swap_classes`` before the test module is collected, it replaces ``transformers.LxmertConfig``,
``LxmertModel``, ``LxmertForPreTraining`` and ``LxmertForQuestionAnswering`` by ours and registers ours in the
auto-class mappings (the test module looks the task models up there to decide which labels to pass).
"""

import transformers
from transformers import AutoModel, AutoModelForPreTraining, AutoModelForQuestionAnswering

import lxmert_fast

SWAPPED = ("LxmertConfig", "LxmertModel", "LxmertForPreTraining", "LxmertForQuestionAnswering")


def pytest_configure(config):
    for name in SWAPPED:
        setattr(transformers, name, getattr(lxmert_fast, name))
    for auto, model in (
        (AutoModel, lxmert_fast.LxmertModel),
        (AutoModelForPreTraining, lxmert_fast.LxmertForPreTraining),
        (AutoModelForQuestionAnswering, lxmert_fast.LxmertForQuestionAnswering),
    ):
        auto.register(lxmert_fast.LxmertConfig, model, exist_ok=True)
