"""Start-up checks of a run's inputs against the model, so that a mismatch stops the run with the file and the
value at fault instead of a torch error (or silently wrong training) later.

Public API
    check_model_sizes(config, source=None)      every size positive (layer counts >= 0), hidden_size divisible by
                                                num_attention_heads, dropout probabilities in [0, 1); a ConfigError
                                                (run_config's) naming the field, the value and the source file
    check_model_fields(fields, source)          the same for a config file's fields (a dict), before LxmertConfig
    load_model_config(path) -> LxmertConfig     a config.json, read with a clear message for broken JSON, and checked
    check_model_folder(path)                    a local model folder's config.json, checked so before a loader reads
                                                it; its safetensors files whole; a training checkpoint's weightless
                                                model/ folder refused with the export command to run
    check_safetensors_file(path)                a .safetensors file whole (not truncated), named when it is not
    index_shards(index_path)                    the shard files a sharded checkpoint's index names
    check_features(stores, config, labels=True) features as wide as config.visual_feat_dim and (labels=True) object /
                                                attribute ids below num_object_labels / num_attr_labels; InputError
                                                naming the feature file (and the line and img_id of the largest id)
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from types import SimpleNamespace

from lxmert_fast.errors import CheckpointError, ConfigError, InputError
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


WEIGHT_FILE_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


def check_model_folder(path) -> None:
    """For a local model folder, before a loader such as transformers' from_pretrained reads it: its config.json
    read by load_model_config (broken JSON or impossible sizes named with the file), its safetensors files whole,
    and a training checkpoint's ``model/`` folder (config and tokenizer, the weights in the training state beside
    it) refused with the command that exports it. Anything else passes."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return
    load_model_config(path / "config.json")
    weights = [name for name in WEIGHT_FILE_NAMES if (path / name).is_file()]
    if not weights and (any(path.parent.glob("*model_states.pt")) or (path.parent / "state.pt").is_file()):
        raise CheckpointError(
            f"{path}: the model description inside a training checkpoint; its weights are in the training state of "
            f"{path.parent}. Export them to a model folder first: python -m lxmert_fast.export {path.parent} "
            "OUT_DIR, then load OUT_DIR"
        )
    for name in weights:
        if name == "model.safetensors":
            check_safetensors_file(path / name)
        elif name == "model.safetensors.index.json":
            for shard in index_shards(path / name):
                check_safetensors_file(path / shard)


def index_shards(index_path) -> list[str]:
    """The shard files a sharded checkpoint's ``*.index.json`` names (its weight_map's values), sorted."""
    try:
        return sorted(set(read_json(index_path, "a shard index ({\"weight_map\": {...}})")["weight_map"].values()))
    except (KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index_path}: not a valid shard index ({error!r})") from None


def check_safetensors_file(path) -> None:
    """A safetensors file must hold every byte its header describes; a truncated or corrupt one is named (the
    safetensors library says only "incomplete metadata, file not fully covered")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in the folder's safetensors index)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if header_size is None or 8 + header_size > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, shorter than its header); "
                                  "save or download it again")
        try:
            header = json.loads(f.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {error})") from None
    if 8 + header_size + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, its header describes "
                              f"{8 + header_size + end}); save or download it again")


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
