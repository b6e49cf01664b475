"""Convert between the original release's `model_LXRT.pth` and a transformers folder, both ways.

    python -m lxmert_fast.convert model_LXRT.pth converted/          # original -> HF folder (safetensors)
    python -m lxmert_fast.convert converted/ model_LXRT.pth          # HF folder -> original layout

The direction follows from the input: a folder is read as HF, a file as the original layout (an HF-layout
.safetensors/.bin file also works). The output loads in `transformers.LxmertForPreTraining.from_pretrained`,
and in the original code's `load_lxmert`, `LXRTEncoder.load` and `load_lxmert_qa`: keys `module.bert.*`, ... as in
the released file. The folder's config goes next to the .pth (model_LXRT.config.json), which the original code
ignores and the way back reads: the number of attention heads cannot be told from the weights' shapes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lxmert_fast.cli import run
from lxmert_fast.files import publish_files
from lxmert_fast.model.checks import load_model_config


def original_to_hf(source: Path, target: Path, config=None, missing_heads: str = "error"):
    """The original `source` file as an HF folder `target`; `config`: an LxmertConfig (default: from the shapes)."""
    from lxmert_fast.model.modeling import LxmertForPreTraining

    model = LxmertForPreTraining.from_pretrained(source, config=config, backend="torch", missing_heads=missing_heads)
    model.save_pretrained(target)
    publish_files(target)  # safetensors writes its file 0600: readable by the group, as the umask allows
    return model


def hf_to_original(source: Path, target: Path):
    from lxmert_fast.model.modeling import LxmertForPreTraining
    from lxmert_fast.model.weights import load_into, read_state_dict, save_original, to_hf_layout

    state_dict = to_hf_layout(read_state_dict(source))
    config = None
    if (source / "config.json").exists():  # validate against the config before writing anything
        config = load_model_config(source / "config.json")
        load_into(LxmertForPreTraining(config, backend="torch"), state_dict, source=str(source), missing_heads="init")
    save_original(state_dict, target, config=config)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lxmert_fast.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="model_LXRT.pth (original) or an HF folder")
    parser.add_argument("target", type=Path, help="an HF folder (from an original file) or a .pth file (from a folder)")
    parser.add_argument("--config", type=Path, help="config.json to use instead of inferring sizes from the weights")
    parser.add_argument(
        "--allow-missing-heads", action="store_true", help="start heads the file lacks from random instead of failing"
    )
    args = parser.parse_args(argv)
    if args.source.is_dir():
        hf_to_original(args.source, args.target)
    else:
        config = load_model_config(args.config) if args.config else None
        missing = "init" if args.allow_missing_heads else "error"
        original_to_hf(args.source, args.target, config=config, missing_heads=missing)
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    run(main)
