"""Checkpoint I/O: transformers folders and the original release's `model_LXRT.pth`, both ways.

Formats:
- HF folder: config.json + model.safetensors (or pytorch_model.bin, or sharded with an *.index.json), keys
  `lxmert.*`, `cls.*`, `obj_predict_head.*`, `answer_head.*`; the LM decoder is tied to the word embeddings.
- Original: a plain state dict with keys `bert.*` for `lxmert.*`, often prefixed `module.` (DataParallel); the
  original fine-tuning checkpoints nest the encoder under `lxrt_encoder.model.` (`lxrt_encoder.model.module.` with
  `--multiGPU`) and keep the task head as `logit_fc.*`. No config: the sizes are inferred from the shapes, except
  where `save_original` wrote a config.json next to the file.

Loading never executes code: safetensors, or `torch.load(weights_only=True)`, which refuses pickled objects.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lxmert_fast.errors import CheckpointError
from lxmert_fast.files import atomic_path
from lxmert_fast.model.checks import check_safetensors_file, index_shards, load_model_config
from lxmert_fast.model.configuration import LxmertConfig

logger = logging.getLogger(__name__)

TIED_KEY = "cls.predictions.decoder.weight"
ORIGINAL_PREFIX = "module."  # the released model_LXRT.pth was saved from DataParallel
ORIGINAL_HEAD_SIZE = 64
ORIGINAL_VISUAL_LOSS_NORMALIZER = 1 / 0.15  # the original code's weight of each visual loss
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing raw state dicts
# ---------------------------------------------------------------------------------------------------------------------


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Read a weights file or an HF folder into a flat {name: tensor} dict on the CPU."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).exists():
                return read_state_dict(path / name)
        raise CheckpointError(f"{path}: no weights file found (looked for {', '.join(WEIGHT_FILES)})")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        check_safetensors_file(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types; all mean "unreadable"
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(
                f"{path}: refusing to load: the file contains pickled Python objects, not only tensors, and loading "
                f"them could execute code ({str(error).splitlines()[0]})"
            ) from error
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {error}") from error
    return _flat_tensors(loaded, path)


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    state_dict = {}
    for shard in index_shards(index_path):
        state_dict.update(read_state_dict(index_path.parent / shard))
    return state_dict


def _flat_tensors(loaded, path) -> dict[str, torch.Tensor]:
    # DeepSpeed and many training scripts wrap the state dict: {"module": {...}} or {"state_dict": {...}}
    if isinstance(loaded, dict):
        for wrapper in ("module", "state_dict", "model"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    bad = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return dict(loaded)


# ---------------------------------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------------------------------


def to_hf_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> transformers keys; HF keys pass through.

    The original code saves `model.state_dict()` as it is: pre-training `bert.*`, `cls.*`, `obj_predict_head.*`,
    `answer_head.*`; fine-tuning (VQA / GQA / NLVR2) `lxrt_encoder.model.bert.*` and its head `logit_fc.*`. Either
    may hold `module.` where DataParallel wrapped a module (`module.bert.*` in the release, fine-tuning's
    `--multiGPU` `lxrt_encoder.model.module.bert.*`). A fine-tuned head `logit_fc.*` is a QA head
    (`answer_head.logit_fc.*`) when its first layer takes the hidden size H, and NLVR2's pair head (kept as
    `logit_fc.*`) when it takes 2H.
    """
    fine_tuned = any(".".join(_without_dataparallel(key)).startswith("lxrt_encoder.") for key in state_dict)
    converted = {}
    for key, value in state_dict.items():
        key = ".".join(_without_dataparallel(key)).removeprefix("lxrt_encoder.model.")
        if key.startswith("bert."):
            key = "lxmert." + key.removeprefix("bert.")
        converted[key] = value
    first = converted.get("logit_fc.0.weight")  # (out, in)
    if fine_tuned and first is not None and first.dim() == 2 and first.shape[0] != first.shape[1]:
        converted = {("answer_head." + k if k.startswith("logit_fc.") else k): v for k, v in converted.items()}
    return converted


def _without_dataparallel(key: str) -> list[str]:
    return [part for part in key.split(".") if part != "module"]  # no LXMERT module is named "module"


def to_original_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers keys -> the released `model_LXRT.pth`'s: `module.bert.*`, `module.cls.*`, ... (saved from
    DataParallel: the original pre-training script's `load_lxmert` loads only `module.` keys), the tied LM decoder
    stored explicitly, as it was. A bare encoder's keys (`embeddings.*`, ...: `LxmertModel`'s) become `bert.*` too."""

    def original_name(key):
        if key.startswith("lxmert."):
            return "bert." + key.removeprefix("lxmert.")
        return "bert." + key if key.startswith(("embeddings.", "encoder.", "pooler.")) else key

    converted = {original_name(key): value for key, value in state_dict.items()}
    if (
        TIED_KEY not in converted
        and "bert.embeddings.word_embeddings.weight" in converted
        and any(key.startswith("cls.") for key in converted)
    ):
        converted[TIED_KEY] = converted["bert.embeddings.word_embeddings.weight"]
    return {ORIGINAL_PREFIX + key: value for key, value in converted.items()}


def config_file_next_to(path) -> Path:
    """Where `save_original` records the config of an original-layout file: model_LXRT.pth -> model_LXRT.config.json
    (the original code's loaders never look at it)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(path.suffix) + ".config.json")


def checkpoint_config(path, state_dict: dict[str, torch.Tensor]) -> LxmertConfig:
    """The config of a checkpoint: a folder's config.json, the config.json `save_original` wrote next to a file,
    or else one inferred from the weights' shapes (`infer_config`, which warns where it guesses)."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else config_file_next_to(path)
    if config_file.is_file():
        return load_model_config(config_file)
    logger.info("%s: no config.json; using a config inferred from the weights' shapes", path)
    return infer_config(state_dict, source=path)


def infer_config(state_dict: dict[str, torch.Tensor], source="checkpoint", **overrides) -> LxmertConfig:
    """A config whose sizes match an HF-layout state dict, for files that come without a config: the original
    code's. So it takes the original's settings where shapes do not tell: the visual losses scaled by 1 / 0.15
    (transformers' default rounds it to 6.67), and heads of size 64 (`num_attention_heads` = hidden / 64, with a
    warning naming `source`: a model with other heads gives other outputs; pass the count in `overrides`)."""
    prefix = "lxmert." if any(key.startswith("lxmert.") for key in state_dict) else ""

    def shape(key):
        full = prefix + key if not key.startswith(("cls.", "obj_predict_head.", "answer_head.")) else key
        if full not in state_dict:
            raise CheckpointError(f"{source}: cannot infer the config: the checkpoint has no {full!r}")
        return tuple(state_dict[full].shape)

    def count(pattern):
        found = {int(m.group(1)) for key in state_dict if (m := re.match(re.escape(prefix) + pattern, key))}
        return max(found) + 1 if found else 0

    vocab_size, hidden = shape("embeddings.word_embeddings.weight")
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_attention_heads": max(1, hidden // ORIGINAL_HEAD_SIZE),
        "intermediate_size": shape("encoder.layer.0.intermediate.dense.weight")[0]
        if count(r"encoder\.layer\.(\d+)\.")
        else shape("encoder.x_layers.0.lang_inter.dense.weight")[0],
        "max_position_embeddings": shape("embeddings.position_embeddings.weight")[0],
        "type_vocab_size": shape("embeddings.token_type_embeddings.weight")[0],
        "l_layers": count(r"encoder\.layer\.(\d+)\."),
        "r_layers": count(r"encoder\.r_layers\.(\d+)\."),
        "x_layers": count(r"encoder\.x_layers\.(\d+)\."),
        "visual_feat_dim": shape("encoder.visn_fc.visn_fc.weight")[1],
        "visual_pos_dim": shape("encoder.visn_fc.box_fc.weight")[1],
        "visual_loss_normalizer": ORIGINAL_VISUAL_LOSS_NORMALIZER,
    }
    if "answer_head.logit_fc.3.weight" in state_dict:
        fields["num_qa_labels"] = state_dict["answer_head.logit_fc.3.weight"].shape[0]
    else:
        fields["task_qa"] = False if any(k.startswith("cls.") for k in state_dict) else LxmertConfig().task_qa
    heads = {"obj": "num_object_labels", "attr": "num_attr_labels"}
    for name, field in heads.items():
        key = f"obj_predict_head.decoder_dict.{name}.weight"
        if key in state_dict:
            fields[field] = state_dict[key].shape[0]
    if any(k.startswith("cls.") for k in state_dict):
        fields["task_obj_predict"] = any(k.startswith("obj_predict_head.") for k in state_dict)
        for name in ("obj", "attr", "feat"):
            fields[f"visual_{name}_loss"] = f"obj_predict_head.decoder_dict.{name}.weight" in state_dict
    if "num_attention_heads" not in overrides:
        logger.warning(
            "%s: the number of attention heads is not recorded in the checkpoint; assuming %d (head size %d, as the "
            "original's). If the model was trained with another count, pass a config",
            source,
            fields["num_attention_heads"],
            ORIGINAL_HEAD_SIZE,
        )
    fields.update(overrides)
    return LxmertConfig(**fields)


# ---------------------------------------------------------------------------------------------------------------------
# Loading into a model and saving a folder
# ---------------------------------------------------------------------------------------------------------------------


def is_lxmert_fast_checkpoint(path, subfolder: str = "") -> bool:
    """True for what transformers' loader cannot read and ours can: a file (the original release's `model_LXRT.pth`,
    the original code's fine-tuned checkpoints, a bare .safetensors/.bin) or a folder without config.json.
    Anything else (an HF folder, a hub id) is transformers' business."""
    if path is None:
        return False
    path = Path(path) / subfolder
    return path.is_file() or (path.is_dir() and not (path / "config.json").exists())


# from_pretrained keywords about fetching from the hub: nothing to do for a local file
HUB_KEYWORDS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")


def load_pretrained(
    cls, path, config=None, missing_heads="init", dtype=None, torch_dtype=None, subfolder="", **model_kwargs
):
    """`cls` built and loaded from a checkpoint `is_lxmert_fast_checkpoint` accepts, in eval mode as transformers
    returns models. The sizes come from `config` or, without one, from the weights' shapes. Weights that the file
    lacks raise a CheckpointError with ``missing_heads="error"``, else start from random with a warning; encoder
    weights that are missing, extra or of another shape always raise (see `load_into`). The remaining
    `model_kwargs` (backend, pack_text) go to the model's constructor."""
    path = Path(path) / subfolder
    for keyword in HUB_KEYWORDS:
        model_kwargs.pop(keyword, None)
    state_dict = to_hf_layout(read_state_dict(path))
    if config is None:
        config = checkpoint_config(path, state_dict)
    model = cls(config, **model_kwargs)
    load_into(model, state_dict, source=str(path), missing_heads=missing_heads)
    dtype = dtype if dtype is not None else torch_dtype
    if dtype not in (None, "auto"):
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()


def raise_on_misfit(model, loading_info: dict, source: str):
    """The strict check of ``from_pretrained(..., missing_heads="error")`` on transformers' loading report: a
    CheckpointError naming every weight that was missing, unexpected or of another shape."""
    problems = []
    if loading_info.get("missing_keys"):
        problems.append(f"missing from the checkpoint: {_listing(sorted(loading_info['missing_keys']))}")
    if loading_info.get("unexpected_keys"):
        problems.append(
            f"keys that {type(model).__name__} does not have: {_listing(sorted(loading_info['unexpected_keys']))}"
        )
    if loading_info.get("mismatched_keys"):
        shapes = [
            f"{key}: checkpoint {tuple(old)} vs model {tuple(new)}" for key, old, new in loading_info["mismatched_keys"]
        ]
        problems.append(f"shapes that do not fit the config: {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_into(model, state_dict, source="checkpoint", missing_heads="error"):
    """Load an HF-layout state dict into `model`, adapting the `lxmert.` prefix between the encoder and the task
    models, and raise a CheckpointError naming every key or shape that does not fit."""
    expected = model.state_dict()
    has_prefix = any(key.startswith("lxmert.") for key in state_dict)
    wants_prefix = any(key.startswith("lxmert.") for key in expected)
    if has_prefix and not wants_prefix:  # a task model's file into the bare encoder: keep the encoder's part
        dropped = sorted({key.split(".")[0] for key in state_dict if not key.startswith("lxmert.")})
        if dropped:
            logger.info("%s: ignoring heads not used by %s: %s", source, type(model).__name__, ", ".join(dropped))
        state_dict = {
            key.removeprefix("lxmert."): value for key, value in state_dict.items() if key.startswith("lxmert.")
        }
    elif wants_prefix and not has_prefix:  # a bare encoder's file into a task model
        state_dict = {"lxmert." + key: value for key, value in state_dict.items()}

    tied = TIED_KEY in expected and model.config.tie_word_embeddings
    missing = [key for key in expected if key not in state_dict and not (tied and key == TIED_KEY)]
    unexpected = [key for key in state_dict if key not in expected]
    encoder_unexpected = [key for key in unexpected if key.startswith("lxmert.") or not wants_prefix]
    if encoder_unexpected:
        raise CheckpointError(
            f"{source}: keys that {type(model).__name__} does not have: {_listing(encoder_unexpected)} "
            "(a different architecture, or a config with fewer layers than the checkpoint?)"
        )
    if unexpected:
        logger.info(
            "%s: ignoring heads not used by %s: %s",
            source,
            type(model).__name__,
            ", ".join(sorted({key.split(".")[0] for key in unexpected})),
        )
    encoder_missing = [key for key in missing if key.startswith("lxmert.") or not wants_prefix]
    if encoder_missing:
        raise CheckpointError(f"{source}: missing encoder weights: {_listing(encoder_missing)}")
    if missing and missing_heads == "error":
        raise CheckpointError(
            f"{source}: the checkpoint lacks these head weights of {type(model).__name__}: {_heads(missing)}. "
            "Pass missing_heads='init' to start them from random."
        )
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if mismatched:
        raise CheckpointError(f"{source}: shapes that do not fit the config: {_listing(mismatched)}")
    model.load_state_dict({key: value for key, value in state_dict.items() if key in expected}, strict=False)
    model.tie_weights()
    if missing:
        logger.warning(
            "%s: these head weights were not in the checkpoint and start from random: %s", source, _heads(missing)
        )


def _heads(keys) -> str:
    """Group head keys by module for messages: cls.predictions, cls.seq_relationship, answer_head, ..."""
    heads = {".".join(key.split(".")[:2]) if key.startswith("cls.") else key.split(".")[0] for key in keys}
    return f"{', '.join(sorted(heads))} ({len(keys)} tensors)"


def _listing(items, limit=8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def save_original(state_dict: dict[str, torch.Tensor], path, config: LxmertConfig | None = None):
    """Write a state dict in the released `model_LXRT.pth`'s layout (`module.bert.*`, ...), as `torch.save` of
    plain tensors; with `config`, also write it next to the file (`config_file_next_to`), so that what the weights'
    shapes cannot tell (the number of attention heads) comes back when the file is loaded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in to_original_layout(state_dict).items()}
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    if config is not None:
        with atomic_path(config_file_next_to(path)) as tmp:
            config.to_json_file(tmp)
