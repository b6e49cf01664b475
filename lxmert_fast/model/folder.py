"""Self-contained model folders: writing one, exporting a training checkpoint to one, and reading one back.

A model folder (final_model/, best_model/, an export, a hub snapshot) holds everything needed to use the model:
config.json (with ``id2label`` / ``label2id`` for a fine-tuned model, as transformers' classification models
have: a VQA / GQA model's answers, NLVR2's False / True), model.safetensors in fp32, and the tokenizer, so
``AutoTokenizer.from_pretrained(folder)``, our ``from_pretrained`` and the scripts' ``--load folder`` need nothing
else. A QA model also keeps its answers as label2ans.json beside the weights (folders from before id2label have
only that). Every training checkpoint carries the same folder without its weights (``MODEL_SPEC``).

    save_model_folder(model, folder, tokenizer, labels)     write one
    export_checkpoint(checkpoint, folder)                   a training checkpoint of either engine, any ZeRO
                                                            stage and rank count -> a folder
    read_task_model(name_or_path, answers=None, tokenizer=None) -> TaskModelFolder
                                                            a fine-tuned folder or hub id: model (weights read
                                                            once), tokenizer, answers, task

Importing this module loads neither torch nor transformers (the commands' --help and flag checks use it).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lxmert_fast.errors import CheckpointError, PredictionError

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # either one makes a folder a tokenizer
LABEL2ANS_FILE = "label2ans.json"  # saved next to a fine-tuned QA model: the meaning of its output rows
MODEL_SPEC = "model"  # the folder, without weights, inside each training checkpoint
QA_MODEL, PAIR_MODEL = "LxmertForQuestionAnswering", "LxmertForNLVR2"


def has_tokenizer(folder) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def save_model_folder(model, folder, tokenizer, labels=None, weights=True):
    """Write ``model`` (any lxmert_fast model) to ``folder``: config.json, model.safetensors in fp32 (unless
    ``weights`` is False), the tokenizer, and for a classifier its ``labels`` (the answer of each output row)."""
    import torch

    from lxmert_fast.files import publish_files, write_json

    Path(folder).mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if labels is not None:
        config.id2label = {i: str(label) for i, label in enumerate(labels)}
        config.label2id = {str(label): i for i, label in enumerate(labels)}
    if weights:
        fp32 = type(model)(config, backend="torch")
        with torch.no_grad():
            fp32.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
        fp32.save_pretrained(folder)
    else:
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if labels is not None and type(model).__name__ == QA_MODEL:
        write_json(Path(folder) / LABEL2ANS_FILE, list(labels), indent=None)
    publish_files(folder)  # safetensors writes its file 0600


def checkpoint_weights(folder) -> dict:
    """The model's weights in a training checkpoint of either engine, any ZeRO stage and any rank count, as the
    model's own state dict (ZeRO-3's shards put together from every rank's fp32 partitions)."""
    from lxmert_fast.train.engines import safe_load
    from lxmert_fast.train.single_device import CHECKPOINT_FILE

    folder = Path(folder)
    torch_engine, deepspeed_engine = folder / CHECKPOINT_FILE, folder / DEEPSPEED_MODEL_FILE
    if torch_engine.is_file():
        state = safe_load(torch_engine, map_location="cpu")["module"]
    elif deepspeed_engine.is_file():
        state = safe_load(deepspeed_engine, map_location="cpu")["module"]
    elif (folder / ZERO3_MODEL_FILE.format(rank=0)).is_file():
        state = zero3_weights(folder)
    else:
        raise CheckpointError(f"{folder}: not a training checkpoint (no {CHECKPOINT_FILE}, {DEEPSPEED_MODEL_FILE} "
                              f"or {ZERO3_MODEL_FILE.format(rank=0)})")
    return {k.removeprefix("model."): v.float() for k, v in state.items()}


DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the whole module, written by rank 0
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"  # ZeRO-3: parameter shapes, empty tensors
ZERO3_OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"  # ZeRO-3: the rank's fp32 partitions


def zero3_weights(folder: Path) -> dict:
    """A ZeRO-3 checkpoint's whole parameters: each rank holds, for every parameter in order, its
    ceil(numel / ranks) elements of the flattened fp32 parameter (the last rank's slice padded); concatenating
    the ranks' slices and cutting the padding gives the parameter."""
    import torch

    from lxmert_fast.train.engines import safe_load

    world = sum(1 for _ in folder.glob(ZERO3_MODEL_FILE.format(rank="*")))
    model_states = safe_load(folder / ZERO3_MODEL_FILE.format(rank=0), map_location="cpu")
    flats = []
    for rank in range(world):
        path = folder / ZERO3_OPTIM_FILE.format(rank=rank)
        if not path.is_file():
            raise CheckpointError(f"{folder}: a ZeRO-3 checkpoint of {world} ranks without {path.name}")
        flats.append(torch.cat(safe_load(path, map_location="cpu")["optimizer_state_dict"]["fp32_flat_groups"]))
    if model_states.get("frozen_param_shapes"):
        raise CheckpointError(f"{folder}: a ZeRO-3 checkpoint with frozen parameters, which export does not gather")
    state, offset = {}, 0
    for group in model_states["param_shapes"]:
        for name, shape in group.items():
            numel = math.prod(shape)
            part = -(-numel // world)
            if offset + part > flats[0].numel():
                raise CheckpointError(f"{folder}: its fp32 partitions are smaller than its parameter shapes say")
            state[name] = torch.cat([flat[offset:offset + part] for flat in flats])[:numel].view(shape)
            offset += part
    for alias, source in model_states.get("shared_params", {}).items():  # tied weights are stored once
        state[alias] = state[source]
    state.update({k: v for k, v in model_states["module"].items() if k not in state and v.numel()})  # buffers
    return state


def export_checkpoint(folder, out_dir):
    """Write the model of checkpoint ``folder`` as a self-contained model folder ``out_dir``."""
    from lxmert_fast.data.tokenizer import load_tokenizer
    from lxmert_fast.model import modeling
    from lxmert_fast.model.configuration import LxmertConfig

    spec = Path(folder) / MODEL_SPEC
    if not (spec / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: no {MODEL_SPEC}/{CONFIG_FILE} (a checkpoint of an older lxmert_fast?)")
    config = LxmertConfig.from_json_file(str(spec / CONFIG_FILE))
    model = getattr(modeling, config.architectures[0])(config, backend="torch")
    model.load_state_dict(checkpoint_weights(folder))
    save_model_folder(model, out_dir, load_tokenizer(str(spec)), config_labels(config))
    return out_dir


def config_labels(config) -> list[str] | None:
    """The config's id2label as a list, unless it is missing or transformers' placeholder LABEL_0, LABEL_1, ..."""
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    if not id2label or sorted(id2label) != list(range(len(id2label))):
        return None
    labels = [id2label[i] for i in range(len(id2label))]
    return None if all(a == f"LABEL_{i}" for i, a in enumerate(labels)) else labels


# ---------------------------------------------------------------------------------------------------------------
# Reading a fine-tuned model: where it is, which head, its answers and tokenizer


def resolve_model_folder(name_or_path) -> Path:
    """A local folder as is; otherwise a hub id ("unc-nlp/lxmert-vqa-uncased"), fetched into (or, offline, read
    from) the hub cache by huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise PredictionError(f"{path}: a model folder is needed (config.json, weights, tokenizer), not a file")
    text = str(name_or_path)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise PredictionError(f"{text}: no such model folder")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(text, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"])
    except Exception as error:  # noqa: BLE001 - offline misses, unknown repos, network errors: all mean "not found"
        raise PredictionError(
            f"{text}: no such model folder, and not found on the hub or in its cache "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    return Path(folder)


def task_model_class(config, state_keys: Iterable[str], where) -> str:
    """QA_MODEL (a VQA / GQA answer classifier) or PAIR_MODEL (NLVR2), from config.architectures or else the
    weights' heads."""
    for name in config.architectures or ():
        if "QuestionAnswering" in name:
            return QA_MODEL
        if "NLVR2" in name:
            return PAIR_MODEL
        if "PreTraining" in name or name == "LxmertModel":
            raise PredictionError(
                f"{where}: a pre-trained {name}, not a model fine-tuned on VQA, GQA or NLVR2; fine-tune it first "
                "(lxmert_fast/finetune.py)"
            )
    keys = set(state_keys)
    if any(k.startswith("answer_head.logit_fc.") for k in keys) and not any(k.startswith("cls.") for k in keys):
        return QA_MODEL
    if any(k.startswith("logit_fc.") for k in keys):
        return PAIR_MODEL
    raise PredictionError(f"{where}: neither a VQA / GQA nor an NLVR2 model (no answer_head or logit_fc weights)")


def read_answers(path) -> list[str]:
    """An answer list from a label2ans JSON list or an ans2label JSON object {answer: index}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PredictionError(f"answer file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise PredictionError(f"{path}: not valid JSON ({error})") from None
    if isinstance(data, list) and all(isinstance(a, str) for a in data):
        return data
    if isinstance(data, dict) and all(isinstance(i, int) and not isinstance(i, bool) for i in data.values()):
        if sorted(data.values()) != list(range(len(data))):
            raise PredictionError(f"{path}: the indices of an ans2label object must be 0..{len(data) - 1}, each once")
        answers = [""] * len(data)
        for answer, i in data.items():
            answers[i] = answer
        return answers
    raise PredictionError(f"{path}: expected a label2ans list of answers or an ans2label object {{answer: index}}")


def model_answers(folder: Path, config, answers=None) -> list[str]:
    """A QA model's answer list: `answers` (a file or a list) if given, else the config's id2label, else
    label2ans.json in the folder; it must have one answer per output row."""
    labels = config_labels(config)
    if answers is not None:
        label2ans, source = (read_answers(answers), str(answers)) if isinstance(answers, str | Path) else (
            [str(a) for a in answers],
            "answers=",
        )
    elif labels is not None and len(labels) == config.num_qa_labels:
        label2ans, source = labels, f"{folder / CONFIG_FILE} (id2label)"
    elif (folder / LABEL2ANS_FILE).is_file():
        label2ans, source = read_answers(folder / LABEL2ANS_FILE), str(folder / LABEL2ANS_FILE)
    else:
        raise PredictionError(
            f"{folder}: no answer list: its config.json has no id2label and there is no {LABEL2ANS_FILE} beside the "
            "weights; pass the answers the model was fine-tuned with (--answers trainval_label2ans.json, as in the "
            "original release's data/vqa/ and data/gqa/)"
        )
    if len(label2ans) != config.num_qa_labels:
        raise PredictionError(
            f"{source}: {len(label2ans)} answers, but the model at {folder} has {config.num_qa_labels} output rows "
            "(the answer list of another task or release?)"
        )
    return label2ans


def model_tokenizer(folder: Path, tokenizer=None):
    """`tokenizer` if given, else the folder's own; loaded."""
    from lxmert_fast.data.tokenizer import load_tokenizer

    if tokenizer is None:
        if not has_tokenizer(folder):
            raise PredictionError(
                f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); pass the one the model was trained with "
                "(--tokenizer DIR_OR_NAME)"
            )
        tokenizer = folder
    return load_tokenizer(tokenizer)


@dataclass
class TaskModelFolder:
    """A fine-tuned model read from its folder: `label2ans` None for NLVR2; `task` what the config's
    finetuning_task says, else None."""

    model: object
    tokenizer: object
    label2ans: list[str] | None
    task: str | None


def read_task_model(name_or_path, answers=None, tokenizer=None) -> TaskModelFolder:
    """Load a fine-tuned model folder or hub id, its weights read once. `answers`: a label2ans / ans2label JSON
    file or a list, for folders whose config lacks id2label; `tokenizer`: for folders without one."""
    from lxmert_fast.model import modeling
    from lxmert_fast.model.configuration import LxmertConfig
    from lxmert_fast.model.weights import load_into, read_state_dict, to_hf_layout
    from lxmert_fast.tasks.registry import TASKS

    folder = resolve_model_folder(name_or_path)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise PredictionError(f"{folder}: no config.json (a transformers-format model folder is needed)")
    config = LxmertConfig.from_json_file(str(config_file))
    state = to_hf_layout(read_state_dict(folder))
    model_class = task_model_class(config, state, folder)
    label2ans = None
    if model_class == QA_MODEL:
        label2ans = model_answers(folder, config, answers)
        config.num_qa_labels = len(label2ans)
    model = getattr(modeling, model_class)(config)
    load_into(model, state, source=str(folder), missing_heads="init")
    task = getattr(config, "finetuning_task", None)
    return TaskModelFolder(model.eval(), model_tokenizer(folder, tokenizer), label2ans, task if task in TASKS else None)
