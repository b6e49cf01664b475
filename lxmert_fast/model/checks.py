"""Start-up checks of a run's inputs against the model, so that a mismatch stops the run with the file and the
value at fault instead of a torch error (or silently wrong training) later.

Public API
    check_model_sizes(config, source=None)      every size positive (layer counts >= 0), hidden_size divisible by
                                                num_attention_heads, dropout probabilities in [0, 1); a ConfigError
                                                (run_config's) naming the field, the value and the source file
    check_model_fields(fields, source)          the same for a config file's fields (a dict), before LxmertConfig
    load_model_config(path) -> LxmertConfig     a config.json, read with a clear message for broken JSON, and checked
    check_model_folder(path)                    a local model folder's config.json, checked so before a loader reads it
    check_features(stores, config, labels=True) features as wide as config.visual_feat_dim and (labels=True) object /
                                                attribute ids below num_object_labels / num_attr_labels; InputError
                                                naming the feature file (and the line and img_id of the largest id)
"""

from __future__ import annotations

import numbers
from pathlib import Path
from types import SimpleNamespace

from lxmert_fast.errors import ConfigError, InputError
from lxmert_fast.files import read_json

# LxmertConfig fields that size a tensor: must be positive integers (layer counts may be 0).
_POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "visual_feat_dim",
    "visual_pos_dim",
    "num_qa_labels",
    "num_object_labels",
    "num_attr_labels",
)
_LAYER_FIELDS = ("l_layers", "x_layers", "r_layers")
_PROBABILITY_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def check_model_sizes(config, source=None) -> None:
    """Raise a ConfigError naming the field, its value and `source` (the config's file) when a size is impossible."""
    where = f"model config {source}" if source is not None else "model config"

    def fail(field, value, why):
        raise ConfigError(f"{where}: {field}={value!r} {why}")

    def is_int(value):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    for field in _POSITIVE_FIELDS + _LAYER_FIELDS:
        if not hasattr(config, field):
            continue
        value = getattr(config, field)
        least = 0 if field in _LAYER_FIELDS else 1
        if not is_int(value) or value < least:
            fail(field, value, f"must be an integer >= {least}")
    for field in _PROBABILITY_FIELDS:
        value = getattr(config, field, 0.0)
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < 1.0:
            fail(field, value, "must be a probability in [0, 1)")
    hidden, heads = config.hidden_size, config.num_attention_heads
    if hidden % heads:
        fail("hidden_size", hidden, f"is not divisible by num_attention_heads={heads}")


def check_model_fields(fields: dict, source) -> None:
    """check_model_sizes for a config file's fields, LxmertConfig's defaults filling the others. Checked before
    LxmertConfig sees them: transformers refuses some values itself, without naming the file."""
    from lxmert_fast.model.configuration import LxmertConfig

    if not isinstance(fields, dict):
        raise ConfigError(f"model config {source}: expected a JSON object of LxmertConfig fields, got a "
                          f"{type(fields).__name__}")
    check_model_sizes(SimpleNamespace(**{**LxmertConfig().to_dict(), **fields}), source)


def load_model_config(path):
    """An LxmertConfig from a config.json, checked by check_model_sizes; broken JSON is reported with its place."""
    from lxmert_fast.model.configuration import LxmertConfig

    fields = read_json(path, "a model config (config.json): a JSON object of LxmertConfig fields")
    check_model_fields(fields, path)
    try:
        return LxmertConfig(**fields)  # as LxmertConfig.from_json_file builds it
    except Exception as err:  # transformers' own validation (e.g. a string where a number belongs)
        raise ConfigError(f"model config {path}: {err}") from err


def check_model_folder(path) -> None:
    """For a local model folder: its config.json read by load_model_config (broken JSON or impossible sizes named
    with the file) before a loader such as transformers' from_pretrained reads it. Anything else passes."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        load_model_config(config_file)


def check_features(stores, config, labels: bool = True) -> None:
    """Check feature stores against the model config before anything is built or written.

    The feature width must equal config.visual_feat_dim. With `labels` (pre-training with the object or attribute
    task), the largest object / attribute label id of each store (recorded at conversion with its line and img_id)
    must be below config.num_object_labels / num_attr_labels."""
    for store in stores:
        name = store.source_name
        if store.feat_dim != config.visual_feat_dim:
            raise InputError(
                f"{name}: features have {store.feat_dim} dimensions, the model's visual_feat_dim is "
                f"{config.visual_feat_dim}; use the feature files the model was made for, or a model config with "
                f"visual_feat_dim={store.feat_dim}"
            )
        if not labels:
            continue
        for kind, field in (("object", "num_object_labels"), ("attribute", "num_attr_labels")):
            largest, limit = store.max_label(kind), getattr(config, field)
            if largest is not None and largest["id"] >= limit:
                raise InputError(
                    f"{name}:{largest['line']} (img_id {largest['img_id']!r}): {kind} label id {largest['id']} is "
                    f"out of range for the model's {field}={limit} (ids 0..{limit - 1})"
                )


__all__ = [
    "ConfigError",
    "check_features",
    "check_model_fields",
    "check_model_folder",
    "check_model_sizes",
    "load_model_config",
]
