"""LXMERT fine-tuning and evaluation on VQA v2, GQA and NLVR2 (DeepSpeed; plain python runs as one process).

    deepspeed lxmert_fast/finetune.py --task vqa          # sample data, from scratch with the sample schedule
                                                          # (SAMPLE_SCHEDULE), about 7 minutes on 2 CPU cores (est.)
    deepspeed --num_gpus 4 lxmert_fast/finetune.py --task vqa --load-lxmert-qa data/pretrained/model_LXRT.pth \
        --train data/vqa/train.json,data/vqa/nominival.json --valid data/vqa/minival.json \
        --features data/mscoco_imgfeat/train2014_obj36.tsv,data/mscoco_imgfeat/val2014_obj36.tsv \
        --ans2label data/vqa/trainval_ans2label.json --answer-table data/lxmert/all_ans.json \
        --tokenizer bert-base-uncased
    python -m lxmert_fast.finetune --task vqa --load output/finetune_vqa/best_model --epochs 0 --test \
        --test-json data/vqa/test.json ...                # evaluate / write the submission file only

Per epoch: train, then evaluate on --valid (metrics.jsonl gets `eval_score`, the task's main metric; the best
model is kept in OUTPUT_DIR/best_model). At the end: OUTPUT_DIR/final_model, and with --test the submission file,
predicted by the best model. The DeepSpeed JSON (--deepspeed_config, default configs/ds_finetune_fp16.json: batch
32, clipping 5.0) decides batch size, precision and ZeRO; the task's learning rate, epochs and warm-up default to
the original's.
"""

import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lxmert_fast.cli import run  # noqa: E402
from lxmert_fast.errors import ConfigError  # noqa: E402
from lxmert_fast.model.checks import check_model_fields  # noqa: E402
from lxmert_fast.model.folder import has_tokenizer  # noqa: E402
from lxmert_fast.tasks.registry import TASK_NAMES, get_task  # noqa: E402  (light, as run_config)
from lxmert_fast.train import run_config  # noqa: E402  (light: --help answers before torch is imported)

# Fine-tuning on the sample data without a starting point or schedule given: the model learns to use the image only
# after several hundred updates at a high learning rate (docs/finetuning.md, "The sample and grounding"); the original's
# schedule (the task registry: 4 epochs, lr 5e-5, BertAdam) is for a pre-trained base-size model on the released data.
SAMPLE_SCHEDULE = {"optimizer": "adamw", "lr": 5e-4, "epochs": 30}


@dataclass(frozen=True)
class FinetuneData:
    """The data flags (comma-separated paths), the task's sample data filled in when no data is given."""

    train: str | None = None
    valid: str | None = None
    test_json: str | None = None
    features: str | None = None
    ans2label: str | None = None
    label2ans: str | None = None
    answer_table: str | None = None
    tokenizer: str | None = None
    sample_data_dir: str = "sample_data"
    max_seq_length: int = 20
    strict: bool = False


@dataclass(frozen=True)
class FinetuneTask:
    """The task, its starting point and loss, and what is evaluated besides the validation score."""

    name: str = "vqa"
    load: str | None = None
    load_lxmert_qa: str | None = None
    from_scratch: bool = False
    model_config: str = "lxmert_small"
    loss: str = "bce"
    test: bool = False
    images_shuffled_score: bool = False


def build_parser():
    p = run_config.make_parser("LXMERT fine-tuning: VQA, GQA, NLVR2 (DeepSpeed, or one device with --engine torch).")
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="the task to fine-tune or evaluate")
    data = p.add_argument_group("data (default: the generated sample data of the task)")
    data.add_argument("--train", help="comma-separated annotation JSON files to train on")
    data.add_argument("--valid", help="comma-separated annotation JSON files to evaluate on after each epoch")
    data.add_argument("--test-json", help="comma-separated annotation JSON files to predict with --test")
    data.add_argument("--features", help="comma-separated object-feature TSV files (converted once to a store)")
    data.add_argument("--ans2label", help="VQA / GQA answer vocabulary, trainval_ans2label.json")
    data.add_argument("--label2ans", help="its trainval_label2ans.json (default: the sibling file, if there)")
    data.add_argument("--answer-table", help="the pre-training all_ans.json (for --load-lxmert-qa)")
    data.add_argument("--tokenizer", help="tokenizer folder or hub name (default: --load's, else bert-base-uncased)")
    data.add_argument("--sample-data-dir", default="sample_data", help="where sample data is generated if needed")
    data.add_argument("--max-seq-length", type=int, default=20, help="text tokens per question or sentence")
    data.add_argument("--strict", action="store_true",
                      help="refuse --train records whose image has no features (--valid / --test-json always do)")
    model = p.add_argument_group("starting point")
    model.add_argument("--load", help="checkpoint whose encoder is loaded: HF folder, our pre-training output, "
                       "model_LXRT.pth, or a fine-tuned model of this task (its head is loaded too)")
    model.add_argument("--load-lxmert-qa", help="pre-training checkpoint: encoder + answer head through the table")
    model.add_argument("--from-scratch", action="store_true", help="random initialisation from --model-config")
    model.add_argument("--model-config", default="lxmert_small", help="config for --from-scratch (file or preset)")
    model.add_argument("--loss", choices=("bce", "ce"), default="bce", help="VQA / GQA loss (NLVR2: always CE)")
    p.add_argument("--test", action="store_true", help="predict --test-json and write the submission file")
    p.add_argument("--images-shuffled-score", action="store_true",
                   help="also score --valid with every image swapped for another one of the set, printed beside the "
                   "score: a model that does as well without its own images does not use them (default with the "
                   "sample data)")
    run_config.add_training_arguments(p, output_dir=None, save_every=None, workers="min(4, cores/2)")
    return p


def resolve(argv=None):
    """The run's RunConfig: flags with the task's defaults; the sample data, and the sample schedule where no
    starting point or schedule is given, when no data is given."""
    parser = build_parser()
    flags, given = run_config.parse_args_with_config(parser, argv)
    spec = get_task(flags["task"])
    flags["output_dir"] = flags["output_dir"] or os.path.join("output", f"finetune_{flags['task']}")
    if sum(bool(flags[k]) for k in ("load", "load_lxmert_qa", "from_scratch")) > 1:
        parser.error("give at most one of --load, --load-lxmert-qa, --from-scratch")
    notes = []
    if flags["train"] is None and flags["valid"] is None and flags["test_json"] is None:
        notes = use_sample_data(flags, spec.answers, given)
    for name in ("epochs", "lr", "warmup"):
        flags[name] = getattr(spec, name) if flags[name] is None else flags[name]
    if flags["test"] and not flags["test_json"]:
        parser.error("--test needs --test-json (the split to predict)")
    if spec.answers and not flags["ans2label"]:
        parser.error(f"--task {flags['task']} needs --ans2label (trainval_ans2label.json)")
    if not flags["features"]:
        parser.error("--features is required with --train / --valid / --test-json")
    # a model folder's own tokenizer (every folder our runs save has one)
    own = flags["load"] if flags["load"] and has_tokenizer(flags["load"]) else None
    flags["tokenizer"] = flags["tokenizer"] or own or "bert-base-uncased"
    run_config.check_files(flags, ("train", "valid", "test_json", "features", "ans2label", "label2ans",
                                   "answer_table", "load", "load_lxmert_qa"))
    model = None
    if flags["from_scratch"] or not (flags["load"] or flags["load_lxmert_qa"]):
        model_file = run_config.find_config(flags["model_config"])
        model = run_config.read_json(model_file, "a model config")
        check_model_fields(model, model_file)
    return run_config.resolve("finetune", flags, default_deepspeed="ds_finetune_fp16.json", model=model,
                              data=run_config.section(FinetuneData, flags),
                              task=run_config.section(FinetuneTask, {**flags, "name": flags["task"]}),
                              notes=tuple(notes))


def use_sample_data(flags, answers, given):
    """No data given: every data flag points at the task's sample data; without --load / --load-lxmert-qa the model
    starts from scratch, and the schedule flags not ``given`` take SAMPLE_SCHEDULE. Returns what it chose, as
    notes."""
    from lxmert_fast.data import ensure_sample_data
    from lxmert_fast.data.finetune_sample import ensure_finetune_sample

    task = flags["task"]
    paths = ensure_finetune_sample(ensure_sample_data(flags["sample_data_dir"]))  # safe when every rank calls it
    flags.update(train=str(paths.split(task, "train")), valid=str(paths.split(task, "valid")),
                 test_json=flags["test_json"] or str(paths.split(task, "test")),
                 features=flags["features"] or str(paths.features_tsv),
                 tokenizer=flags["tokenizer"] or str(paths.tokenizer_dir),
                 answer_table=flags["answer_table"] or str(paths.answer_table))
    flags["images_shuffled_score"] = True  # the sample is there to show that the model uses the image
    if answers:
        flags["ans2label"] = flags["ans2label"] or str(paths.ans2label(task))
    if flags["load"] or flags["load_lxmert_qa"]:
        return []
    flags["from_scratch"] = True
    chosen = {name: value for name, value in SAMPLE_SCHEDULE.items() if name not in given}
    flags.update(chosen)
    shown = ", ".join(f"--{name} {value}" for name, value in chosen.items())
    return [f"sample data: --from-scratch{', ' + shown if shown else ''} (the sample's schedule; the task's own "
            "defaults are the original's, for a pre-trained model on the released data)"]


def main(argv=None):
    """Fine-tune and / or evaluate; returns {"valid": metrics, "best_score", "test": metrics, "submission"}."""
    try:
        config = resolve(argv)
    except ConfigError as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from lxmert_fast.train.finetune_run import finetune

    return finetune(config)


if __name__ == "__main__":
    run(main)
