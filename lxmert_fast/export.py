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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a training checkpoint to a self-contained model folder.")
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. output/pretrain/checkpoints/step000000008")
    parser.add_argument("out_dir", help="the model folder to write")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(f"{args.checkpoint}: no such checkpoint folder")
    from lxmert_fast.model.folder import export_checkpoint

    export_checkpoint(args.checkpoint, args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    run(main)
