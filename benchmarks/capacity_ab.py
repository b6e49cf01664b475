"""What the static shapes' row counts buy a static-shape training step (torch.compile, CUDA graphs): ours with
``StaticShapes(text_rows, lm_label_rows)`` from the data's statistics (bench_model.our_extras, as pretrain.py
trains) against ours with ``StaticShapes()`` (text padded to 20, the LM head at every token), on the same weights
and batch, alternating rounds.

    python benchmarks/capacity_ab.py --batch 256                 # GPU: graphed steps, triton backend, bf16
    python benchmarks/capacity_ab.py --batch 128 --rounds 3      # CPU: the static-shape path run eagerly, fp32

On a GPU each variant is a CUDA-graphed step (forward, backward, fused AdamW); on a CPU graphs do not exist, so
the static-shape path runs eagerly. The batch is bench_model's: captions of 8-20 tokens padded to 20, 15% of tokens
masked, 36 objects.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402 - benchmarks/ is not a package


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds; each runs one step of each variant")
    parser.add_argument("--model-config", default="lxmert_base", help="a config.json or a preset in configs/")
    args = parser.parse_args(argv)

    from lxmert_fast import LxmertConfig
    from lxmert_fast.model.static_shapes import StaticShapes
    from lxmert_fast.resources import find_config

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LxmertConfig.from_json_file(find_config(args.model_config))
    state = bench_model.reference_state(config, "LxmertForPreTraining")
    batch = bench_model.make_batch(config, args.batch, 20, 36, device)
    shapes = bench_model.our_extras(batch, train=True, static=True)["static_shapes"]
    steps = {}
    for name, static in (("without row counts", StaticShapes()), ("with row counts", shapes)):
        model = bench_model.build(f"lxmert_fast[{'triton' if cuda else 'torch'}]", config, state,
                                  "LxmertForPreTraining", device)
        extra = {"lm_logits_at_labels_only": True, "static_shapes": static}
        steps[name] = bench_model._train_step(model, batch, dtype, device, "graphed" if cuda else "", ours=True,
                                              extra=extra)
    mask = batch["attention_mask"]
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, batch {args.batch}, {dtype}: {shapes}; "
          f"{int(mask.sum())} real text tokens of {mask.numel()}, {int((batch['labels'] != -100).sum())} masked")
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up (graphs are already captured)
    for _ in range(args.rounds):
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name}: {ms:.1f} ms per step ({args.batch / ms * 1e3:.0f} samples/s), median of {args.rounds}")
    print(f"speed-up: {medians['without row counts'] / medians['with row counts']:.3f}x")


if __name__ == "__main__":
    main()
