"""LXMERT pre-training: the five tasks of the paper, DeepSpeed ZeRO + fp16, exact resume.

    deepspeed lxmert_fast/pretrain.py                     # sample data, small model, a minute or two on CPU
    deepspeed --num_gpus 4 lxmert_fast/pretrain.py --config configs/recipe_lxmert_paper.json \
        --train-json data/lxmert/mscoco_train.json,... --features a.tsv,b.tsv --answer-table data/lxmert/all_ans.json
    python -m lxmert_fast.pretrain ...                    # the same, as one process
    python -m lxmert_fast.pretrain --engine torch --deepspeed_config ds_paper_1gpu_bf16.json ...
                                                          # one GPU, no DeepSpeed, the step as a CUDA graph

The DeepSpeed JSON (--deepspeed_config) decides batch size, accumulation, precision and ZeRO stage; everything
else is a flag here, and ``--config FILE.json`` may supply any flag (the command line wins). The run's resolved
configuration is printed at the start and saved as OUTPUT_DIR/run_config.json.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script (deepspeed lxmert_fast/pretrain.py): make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lxmert_fast.cli import run  # noqa: E402
from lxmert_fast.train import pretrain_run  # noqa: E402  (light: --help answers before torch is imported)


def main(argv=None):
    """Pre-train; returns the final model's folder."""
    return pretrain_run.pretrain(pretrain_run.resolve(argv))


if __name__ == "__main__":
    run(main)
