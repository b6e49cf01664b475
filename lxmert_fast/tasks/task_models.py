"""Fine-tuning task models (lxmert_fast.tasks.registry declares the tasks): predictions, and how a task model starts
from a checkpoint.

    task   model                        head on the pooled output                       loss
    vqa    LxmertForQuestionAnswering   answer_head.logit_fc -> 3129 answers            BCE-with-logits x answers
    gqa    LxmertForQuestionAnswering   answer_head.logit_fc -> 1842 answers            same (or CE: --loss ce)
    nlvr2  LxmertForNLVR2               logit_fc on the two passes' pooled vectors -> 2 CE

Starting points (`build_task_model`), as the original's `--loadLXMERT` / `--loadLXMERTQA`:
- `load`: the encoder (`lxmert.*`, pooler included) of any checkpoint: our pre-training output, an HF folder, the
  original `model_LXRT.pth`. Its pre-training heads are ignored and the task head starts from random, except when
  the checkpoint is a fine-tuned model of the same task (no pre-training heads, a head of the same shape, the same
  answer vocabulary): then the head is loaded too, which is how a fine-tuned model is evaluated or tested.
- `load_qa`: the encoder, plus the task's answer head from the pre-training QA head: the hidden layers
  (logit_fc.0, .2) copied, and each output row taken from the row of the same answer in the pre-training answer
  table (all_ans.json, normalised string match); answers with no match start from zero, weight and bias.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lxmert_fast.cli import plural
from lxmert_fast.data.formats import AnswerTable
from lxmert_fast.errors import CheckpointError
from lxmert_fast.files import read_json
from lxmert_fast.model.configuration import LxmertConfig
from lxmert_fast.model.folder import LABEL2ANS_FILE
from lxmert_fast.model.weights import checkpoint_config, load_into, read_state_dict, to_hf_layout
from lxmert_fast.tasks.registry import Task, get_task

# ---------------------------------------------------------------------------------------------------------------
# Predictions


def predict(task: str, logits: torch.Tensor, label2ans=None) -> list:
    """Arg-max predictions: answer strings for VQA / GQA, 0 / 1 for NLVR2."""
    best = logits.argmax(dim=-1).tolist()
    return [label2ans[i] for i in best] if get_task(task).answers else best


# ---------------------------------------------------------------------------------------------------------------
# Starting points


def build_task_model(
    task: str,
    *,
    load=None,
    load_qa=None,
    answer_table=None,
    label2ans=None,
    config: LxmertConfig | None = None,
    backend: str = "auto",
    log=print,
):
    """A task model from `load` or `load_qa` (see the module docstring), or from random with `config`.

    label2ans: the task's answer vocabulary (VQA / GQA); answer_table: all_ans.json (or an
    AnswerTable) whose order is the pre-training QA head's rows, needed with `load_qa`.
    """
    spec = get_task(task)
    if load is not None and load_qa is not None:
        raise ValueError("give either --load or --load-lxmert-qa, not both")
    source = load_qa if load_qa is not None else load
    if source is None:
        if config is None:
            raise ValueError("no checkpoint and no config: nothing to build the model from")
        config = copy.deepcopy(config)
        if spec.answers:
            config.num_qa_labels = len(label2ans)
        log(f"{task}: model starts from random initialisation (no --load)")
        return spec.model_class(config, backend=backend)

    path = Path(source)
    state = to_hf_layout(read_state_dict(path))
    config = checkpoint_config(path, state)
    if spec.answers:
        config.num_qa_labels = len(label2ans)
    model = spec.model_class(config, backend=backend)
    encoder = {k.removeprefix("lxmert."): v for k, v in state.items() if k.startswith("lxmert.")}
    load_into(model.lxmert, encoder, source=str(path))

    if load_qa is not None:
        if not spec.answers:
            raise ValueError("--load-lxmert-qa is for VQA / GQA: NLVR2's pair head has no answer rows; use --load")
        if answer_table is None:
            raise ValueError("--load-lxmert-qa needs the pre-training answer table (--answer-table all_ans.json)")
        init_answer_head_from_qa(model, state, answer_table, label2ans, source=str(path), log=log)
        return model

    _load_task_head(model, spec, state, path, label2ans, log)
    return model


def _load_task_head(model, spec: Task, state: dict, path: Path, label2ans, log) -> None:
    """The task head from a fine-tuned model of the same task; a pre-training checkpoint's heads are never used."""
    head = {k.removeprefix(spec.head_prefix): v for k, v in state.items() if k.startswith(spec.head_prefix)}
    head_module = model.get_submodule(spec.head_prefix.rstrip("."))
    expected = head_module.state_dict()
    is_pretraining = any(k.startswith(("cls.", "obj_predict_head.")) for k in state)
    fits = set(head) == set(expected) and all(head[k].shape == expected[k].shape for k in head)
    if fits and not is_pretraining:
        _check_label2ans(path, label2ans)
        head_module.load_state_dict(head)
        log(f"{spec.name}: encoder and task head loaded from {path}")
    else:
        log(f"{spec.name}: encoder loaded from {path}; the task head starts from random initialisation")


def _check_label2ans(path: Path, label2ans) -> None:
    """A fine-tuned QA model's rows only mean something with the vocabulary it was trained on."""
    saved = path / LABEL2ANS_FILE if path.is_dir() else None
    if label2ans is None or saved is None or not saved.is_file():
        return
    if read_json(saved, "the model's answers (label2ans.json): a JSON list of answers") != list(label2ans):
        raise CheckpointError(
            f"{path}: its answer head was trained on the answers in {saved}, which differ from this run's answer "
            "vocabulary; use --load-lxmert-qa or the matching --ans2label"
        )


def init_answer_head_from_qa(model, state: dict, answer_table, label2ans, source="checkpoint", log=print):
    """Initialise `model.answer_head.logit_fc` from a pre-training QA head in `state` (HF layout).

    logit_fc.0 (Linear) and .2 (LayerNorm) are copied; row k of logit_fc.3 (weight and bias) is the pre-training
    row of answer label2ans[k] in `answer_table` after normalisation, or zero when the table has no such answer.
    Returns (matched, unmatched) and logs the count.
    """
    table = answer_table if isinstance(answer_table, AnswerTable) else AnswerTable(answer_table)
    keys = [f"answer_head.logit_fc.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")]
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{source}: no pre-training QA head to load answers from (missing {', '.join(missing)})")
    rows = state["answer_head.logit_fc.3.weight"]  # (answers in the table, 2H)
    if rows.shape[0] != len(table):
        raise CheckpointError(
            f"{source}: the QA head has {rows.shape[0]} answers but the answer table {table.path} holds {len(table)}"
        )
    head = model.answer_head.logit_fc
    with torch.no_grad():
        for i in (0, 2):
            for p in ("weight", "bias"):
                src = state[f"answer_head.logit_fc.{i}.{p}"]
                dst = getattr(head[i], p)
                if src.shape != dst.shape:
                    raise CheckpointError(
                        f"{source}: answer_head.logit_fc.{i}.{p} is {tuple(src.shape)}, the model "
                        f"needs {tuple(dst.shape)}"
                    )
                dst.copy_(src)
        weight, bias = head[3].weight, head[3].bias
        matched = 0
        for label, ans in enumerate(label2ans):
            row = table.ans2id(ans)
            if row is None:
                weight[label].zero_()
                bias[label].zero_()
            else:
                weight[label].copy_(rows[row])
                bias[label].copy_(state["answer_head.logit_fc.3.bias"][row])
                matched += 1
    unmatched = len(label2ans) - matched
    log(f"Loaded {plural(matched, 'answer')} from LXMERT QA pre-training and {unmatched} not ({source}, table "
        f"{table.path})")
    return matched, unmatched


__all__ = [
    "build_task_model",
    "init_answer_head_from_qa",
    "predict",
]
