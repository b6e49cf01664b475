"""Load the detector's weights safely from a hub id, the hub cache, or a local file.

Nothing in a weight file is ever executed: safetensors files are plain buffers; PyTorch files go through
torch.load(weights_only=True); detectron2-style pickles ({"model": {name: numpy array}}, the converted bottom-up-
attention weights) through an unpickler that builds numpy arrays, dicts and lists and refuses every other global.
A file that tries anything else raises WeightsError naming the file and what it asked for.

The state dict is the hub's unc-nlp/frcnn-vg-finetuned layout (transformers' research FRCNN): old "gamma"/"beta"
batch-norm names are renamed, the stored anchors (recomputed from the config) and batch-norm counters ignored.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import torch

from lxmert_fast.detector.model import DetectorConfig, FasterRCNN
from lxmert_fast.errors import WeightsError

HUB_ID = "unc-nlp/frcnn-vg-finetuned"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model_final.pkl")
CONFIG_FILE = "detector_config.json"
IGNORED = ("num_batches_tracked", "anchor_generator.cell_anchors")

# The only globals a weight pickle may name: what numpy needs to rebuild an array, and plain containers.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise WeightsError(f"{self.path}: refused to load: the pickle asks for {module}.{name}, not an array")


def load_pickled_arrays(path) -> dict:
    """A detectron2 .pkl of numpy arrays, read without executing anything."""
    with open(path, "rb") as f:
        try:
            data = _ArrayUnpickler(f, path).load()
        except WeightsError:
            raise
        except Exception as err:  # a truncated or foreign file: name it
            raise WeightsError(f"{path}: not a pickle of arrays ({type(err).__name__}: {err})") from None
    model = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(model, dict) or not all(isinstance(v, np.ndarray) for v in model.values()):
        raise WeightsError(f"{path}: expected a dict of numpy arrays (or {{'model': ...}})")
    return {k: torch.from_numpy(np.array(v)) for k, v in model.items()}


def load_state_dict(path) -> dict:
    """Read a weight file (.safetensors, PyTorch .bin/.pt/.pth, or detectron2 .pkl) into a dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weight file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pkl":
        return load_pickled_arrays(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{path}: refused to load: not plain tensors ({str(err).splitlines()[0]})") from None
    except Exception as err:
        raise WeightsError(f"{path}: cannot read the weights ({type(err).__name__}: {err})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


def resolve(source) -> Path:
    """A local file, a folder holding one of WEIGHT_FILES, or a hub id (from the hub cache, downloaded if the hub
    is reachable and HF_HUB_OFFLINE is not set)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"{path}: none of {', '.join(WEIGHT_FILES)} in this folder")
    if str(source).count("/") != 1 or str(source).startswith((".", "/")):
        raise WeightsError(f"{source}: no such file or folder (and not a hub id like {HUB_ID})")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in ("pytorch_model.bin", "model.safetensors"):
        try:
            return Path(hf_hub_download(str(source), name))
        except Exception as err:  # offline and not cached, no such file, no such repo
            errors.append(f"{name}: {type(err).__name__}")
    raise WeightsError(f"{source}: no detector weights in the hub cache or on the hub ({'; '.join(errors)})")


def convert(state: dict) -> dict:
    """The hub layout from older names: batch-norm gamma/beta -> weight/bias; ignored keys dropped."""
    out = {}
    for key, value in state.items():
        if any(part in key for part in IGNORED):
            continue
        out[key.replace(".gamma", ".weight").replace(".beta", ".bias")] = value
    return out


def config_beside(path: Path) -> DetectorConfig | None:
    """A DetectorConfig saved as CONFIG_FILE (JSON of its fields) beside the weights: a detector of other sizes."""
    file = path.parent / CONFIG_FILE
    if not file.is_file():
        return None
    fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    data = json.loads(file.read_text())
    if not isinstance(data, dict) or set(data) - fields:
        raise WeightsError(f"{file}: expected an object with fields among {sorted(fields)}")
    return DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def load_detector(source=HUB_ID, cfg: DetectorConfig | None = None, device="cpu", **overrides) -> FasterRCNN:
    """The detector with the weights of `source` (hub id, folder or file), in eval mode on `device`. The config is
    `cfg`, else the CONFIG_FILE beside the weights, else the released detector's; `overrides` replace fields
    (e.g. min_size=800)."""
    path = resolve(source)
    state = convert(load_state_dict(path))
    cfg = dataclasses.replace(cfg or config_beside(path) or DetectorConfig(), **overrides)
    model = FasterRCNN(cfg)
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not k.endswith(IGNORED)]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        problems = [
            (f"{len(wrong)} with another shape", wrong),
            (f"{len(missing)} missing", missing),
            (f"{len(unexpected)} unexpected", unexpected),
        ]
        raise WeightsError(
            f"{path}: weights do not fit the detector config: "
            + "; ".join(f"{what}, e.g. {', '.join(keys[:3])}" for what, keys in problems if keys)
        )
    model.load_state_dict(state, strict=False)
    return model.eval().to(device)
