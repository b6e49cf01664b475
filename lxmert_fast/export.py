"""Self-contained model folders, and a checkpoint exported to one.

A model folder (final_model/, best_model/, or an export) holds everything needed to use the model:
config.json (with ``id2label`` / ``label2id`` for a fine-tuned model, as transformers' classification models
have), model.safetensors in fp32, and the tokenizer, so ``AutoTokenizer.from_pretrained(folder)``, our
``from_pretrained`` and the scripts' ``--load folder`` need nothing else.

Every training checkpoint carries the same folder without its weights (``checkpoints/stepN/model/``), so any
checkpoint of either engine exports with one command::

    python -m lxmert_fast.export output/pretrain/checkpoints/step000000008 my_model
"""

from __future__ import annotations

import argparse
import copy
import json
import os

from lxmert_fast.cli import run
from lxmert_fast.errors import CheckpointError

MODEL_SPEC = "model"  # the folder, without weights, inside each checkpoint


def nlvr2_labels():
    return ["False", "True"]


def save_model_folder(model, folder, tokenizer, labels=None, weights=True):
    """Write ``model`` (any lxmert_fast model) to ``folder``: config.json, model.safetensors in fp32 (unless
    ``weights`` is False), the tokenizer, and for a classifier its ``labels`` (the answer of each output row)."""
    import torch

    os.makedirs(folder, exist_ok=True)
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
    if labels is not None and type(model).__name__ == "LxmertForQuestionAnswering":
        from lxmert_fast.tasks.task_models import LABEL2ANS_FILE

        with open(os.path.join(folder, LABEL2ANS_FILE), "w") as f:
            json.dump(list(labels), f)


def checkpoint_weights(folder) -> dict:
    """The model's weights in a training checkpoint of either engine, as the model's own state dict."""
    from lxmert_fast.train.engines import safe_load
    from lxmert_fast.train.single_device import CHECKPOINT_FILE

    torch_engine = os.path.join(folder, CHECKPOINT_FILE)
    deepspeed_engine = os.path.join(folder, "mp_rank_00_model_states.pt")
    if os.path.isfile(torch_engine):
        state = safe_load(torch_engine, map_location="cpu")["module"]
    elif os.path.isfile(deepspeed_engine):
        saved = safe_load(deepspeed_engine, map_location="cpu")
        state = saved["module"]
        if any(v.numel() == 0 for v in state.values()):
            raise CheckpointError(f"{folder}: a ZeRO-3 checkpoint holds shards only; gather them first with "
                                  "DeepSpeed's zero_to_fp32.py")
    else:
        raise CheckpointError(f"{folder}: not a training checkpoint (no {CHECKPOINT_FILE} or "
                              "mp_rank_00_model_states.pt)")
    return {k.removeprefix("model."): v.float() for k, v in state.items()}


def export_checkpoint(folder, out_dir):
    """Write the model of checkpoint ``folder`` as a self-contained model folder ``out_dir``."""
    import lxmert_fast
    from lxmert_fast.data.pretrain_dataset import load_tokenizer
    from lxmert_fast.model.configuration import LxmertConfig

    spec = os.path.join(folder, MODEL_SPEC)
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise CheckpointError(f"{folder}: no {MODEL_SPEC}/config.json (a checkpoint of an older lxmert_fast?)")
    config = LxmertConfig.from_json_file(os.path.join(spec, "config.json"))
    model_class = getattr(lxmert_fast, config.architectures[0])
    model = model_class(config, backend="torch")
    model.load_state_dict(checkpoint_weights(folder))
    labels = [config.id2label[i] for i in range(len(config.id2label))] if _has_labels(config) else None
    save_model_folder(model, out_dir, load_tokenizer(spec), labels)
    return out_dir


def _has_labels(config) -> bool:
    return bool(getattr(config, "label2id", None)) and any(not k.startswith("LABEL_") for k in config.label2id)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a training checkpoint to a self-contained model folder.")
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. output/pretrain/checkpoints/step000000008")
    parser.add_argument("out_dir", help="the model folder to write")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(f"{args.checkpoint}: no such checkpoint folder")
    export_checkpoint(args.checkpoint, args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    run(main)
