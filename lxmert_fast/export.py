"""Export a training checkpoint to a self-contained model folder (config.json, model.safetensors in fp32, the
tokenizer, a fine-tuned model's labels; lxmert_fast.model.folder writes it).

Every training checkpoint carries that folder without its weights (``checkpoints/stepN/model/``), so any
checkpoint of either engine exports with one command::

    python -m lxmert_fast.export output/pretrain/checkpoints/step000000008 my_model
"""

from __future__ import annotations

import argparse
import os

from lxmert_fast.cli import run
from lxmert_fast.errors import CheckpointError


def check_one_checkpoint(folder) -> None:
    """A folder of checkpoints (a run's ``checkpoints/``) is not one: say which it holds and which is the latest."""
    tags = sorted(t for t in os.listdir(folder) if t.startswith("step") and os.path.isdir(os.path.join(folder, t)))
    if not tags:
        return
    latest = os.path.join(folder, "latest")
    pointer = open(latest).read().strip() if os.path.isfile(latest) else None
    shown = ", ".join(f"{t} (latest)" if t == pointer else t for t in tags)
    example = os.path.join(folder, pointer if pointer in tags else tags[-1])
    raise CheckpointError(f"{folder} is a folder of checkpoints, not one: it holds {shown}; export one, e.g. "
                          f"python -m lxmert_fast.export {example} OUT_DIR")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a training checkpoint to a self-contained model folder.")
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. output/pretrain/checkpoints/step000000008")
    parser.add_argument("out_dir", help="the model folder to write")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(f"{args.checkpoint}: no such checkpoint folder")
    check_one_checkpoint(args.checkpoint)
    from lxmert_fast.model.folder import export_checkpoint

    export_checkpoint(args.checkpoint, args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    run(main)
