"""Fine-tuning: data formats and errors, metrics, submission files, checkpoint starting points, and short runs.

Everything runs on tiny configs (hidden 32, 32-d features, 150 sample images) so the file takes well under a
minute or two on a 2-core CPU.
"""

import json
import math

import numpy as np
import pytest
import torch
import transformers

from lxmert_fast import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining
from lxmert_fast.data import FeatureStore, ensure_sample_data
from lxmert_fast.data.finetune_dataset import AnswerVocab, NLVR2Dataset, QADataset, finetune_collate
from lxmert_fast.data.finetune_sample import ensure_finetune_sample
from lxmert_fast.errors import AnnotationFormatError, CheckpointError
from lxmert_fast.model.folder import LABEL2ANS_FILE
from lxmert_fast.model.weights import save_original
from lxmert_fast.tasks.metrics import gqa_accuracy, nlvr2_accuracy, nlvr2_consistency, sentence_id, vqa_score
from lxmert_fast.tasks.scoring import evaluate, read_submission, write_submission
from lxmert_fast.tasks.task_models import build_task_model

TINY = dict(
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    l_layers=1,
    x_layers=1,
    r_layers=1,
    visual_feat_dim=32,
    max_position_embeddings=32,
    num_object_labels=25,
    num_attr_labels=10,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    paths = ensure_sample_data(root / "sample_data", num_images=150, feat_dim=32)
    ft = ensure_finetune_sample(paths)
    model_config = root / "tiny.json"
    model_config.write_text(json.dumps({"model_type": "lxmert", **TINY}))
    ds_config = root / "ds.json"  # fp32, no ZeRO: the cheapest engine on a CPU
    ds_config.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 32,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 5.0,
                "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": 0},
            }
        )
    )
    return {
        "root": root,
        "paths": paths,
        "ft": ft,
        "model_config": model_config,
        "ds_config": ds_config,
        "store": FeatureStore.from_tsv(paths.features_tsv, progress=False),
    }


def cli(sample, task, out, *extra):
    ft, paths = sample["ft"], sample["paths"]
    argv = [
        "--task",
        task,
        "--train",
        str(ft.split(task, "train")),
        "--valid",
        str(ft.split(task, "valid")),
        "--test-json",
        str(ft.split(task, "test")),
        "--features",
        str(paths.features_tsv),
        "--tokenizer",
        str(paths.tokenizer_dir),
        "--deepspeed_config",
        str(sample["ds_config"]),
        "--model-config",
        str(sample["model_config"]),
        "--output-dir",
        str(out),
        "--num-workers",
        "0",
    ]
    if task != "nlvr2":
        argv += ["--ans2label", str(ft.ans2label(task))]
    return argv + list(extra)


# ----------------------------------------------------------------------------------------------- short runs
def test_vqa_finetuning_beats_untrained_model(sample, tmp_path):
    from lxmert_fast.finetune import main

    untrained = main(cli(sample, "vqa", tmp_path / "untrained", "--from-scratch", "--epochs", "0"))
    # 20 epochs: on the sample (version 3) a tiny model from scratch learns the answers' priors after ~15 epochs
    tuned = main(cli(sample, "vqa", tmp_path / "tuned", "--from-scratch", "--epochs", "20", "--lr", "1e-3", "--test"))
    before, after = untrained["valid"]["eval_score"], tuned["best_score"]
    assert after > before + 0.1, (before, after)

    records = [json.loads(line) for line in open(tmp_path / "tuned" / "metrics.jsonl")]
    evals = [r for r in records if r.get("split") == "valid"]
    assert all(r["event"] == "eval" for r in evals) and all("event" in r for r in records)
    assert len(evals) == 20 and all("eval_score" in r for r in evals)
    assert max(r["eval_score"] for r in evals) == after
    assert (tmp_path / "tuned" / "best_model" / LABEL2ANS_FILE).is_file()

    # the submission parses back: one answer of the vocabulary per test question, ids as in the file
    submitted = read_submission("vqa", tuned["submission"])
    questions = json.load(open(sample["ft"].split("vqa", "test")))
    assert list(submitted) == [q["question_id"] for q in questions]
    assert set(submitted.values()) <= set(json.load(open(sample["ft"].label2ans("vqa"))))

    # the best model's folder is self-contained: its tokenizer, and its answers in config.json as transformers has them
    best = tmp_path / "tuned" / "best_model"
    answers = json.load(open(sample["ft"].label2ans("vqa")))
    saved = json.loads((best / "config.json").read_text())
    assert saved["id2label"] == {str(i): a for i, a in enumerate(answers)}
    assert saved["label2id"] == {a: i for i, a in enumerate(answers)}
    assert len(transformers.AutoTokenizer.from_pretrained(str(best))) == saved["vocab_size"]

    # the fine-tuned model, reloaded with its head (and its own tokenizer), scores the same without training, and
    # --test predicted with it: the same submission
    argv = cli(sample, "vqa", tmp_path / "again", "--load", str(best), "--epochs", "0", "--test")
    again = main(argv[:argv.index("--tokenizer")] + argv[argv.index("--tokenizer") + 2:])
    assert again["valid"]["eval_score"] == pytest.approx(after)
    assert read_submission("vqa", again["submission"]) == submitted


def test_a_validation_set_smaller_than_one_batch_is_evaluated(sample, tmp_path):
    """3 questions, micro-batch 32: one partial batch, a real score (not NaN), every question predicted."""
    small = tmp_path / "valid3.json"
    small.write_text(json.dumps(json.load(open(sample["ft"].split("vqa", "valid")))[:3]))
    argv = cli(sample, "vqa", tmp_path / "out", "--from-scratch", "--epochs", "0")
    argv[argv.index("--valid") + 1] = str(small)
    result = main_of_finetune(argv)
    assert 0.0 <= result["valid"]["eval_score"] <= 1.0


def main_of_finetune(argv):
    from lxmert_fast.finetune import main

    return main(argv)


@pytest.mark.parametrize("task", ["gqa", "nlvr2"])
def test_short_run_writes_metrics_and_submission(sample, tmp_path, task):
    from lxmert_fast.finetune import main

    result = main(cli(sample, task, tmp_path, "--from-scratch", "--max-steps", "3", "--test"))
    assert 0.0 <= result["valid"]["eval_score"] <= 1.0
    if task == "nlvr2":
        assert set(result["valid"]) == {"eval_score", "accuracy", "consistency"}
        assert result["test"] is not None  # the NLVR2 test split is labelled
        lines = open(result["submission"]).read().splitlines()
        assert all(line.rsplit(",", 1)[1] in ("True", "False") for line in lines)
        assert len(lines) == len(json.load(open(sample["ft"].split(task, "test"))))
    else:
        submitted = json.load(open(result["submission"]))
        assert submitted and set(submitted[0]) == {"questionId", "prediction"}
    assert any("eval_score" in json.loads(line) for line in open(tmp_path / "metrics.jsonl"))


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_compiled_run_scores_as_the_eager_run(sample, tmp_path, engine):
    """--compile (torch.compile, through DeepSpeed's engine.compile() or directly; Inductor's C++ backend on a CPU)
    trains the same model: the losses and the validation score follow the eager run's, to within what different
    dropout masks change."""
    from torch._dynamo.utils import counters

    from lxmert_fast.finetune import main

    args = ("--from-scratch", "--max-steps", "2", "--epochs", "1", "--log-every", "1", "--engine", engine)
    eager = main(cli(sample, "vqa", tmp_path / "eager", *args))
    torch._dynamo.reset()  # an earlier compiled run's cached graphs would be reused: count fresh ones only
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = main(cli(sample, "vqa", tmp_path / "compiled", *args, "--compile"))
    assert counters["stats"]["unique_graphs"] > graphs_before, "--compile compiled nothing"
    losses = {mode: [json.loads(line)["loss"] for line in open(tmp_path / mode / "metrics.jsonl")
                     if '"loss"' in line] for mode in ("eager", "compiled")}
    assert len(losses["compiled"]) == 2 and all(math.isfinite(v) for v in losses["compiled"])
    # the same weights and batches; only the dropout masks differ (Inductor draws its own): 0.1-0.3% measured
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=0.02)
    assert compiled["valid"]["eval_score"] == pytest.approx(eager["valid"]["eval_score"], abs=0.02)


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_torch_engine_trains_as_deepspeed(sample, tmp_path, task, capsys):
    """--engine torch (one device, plain PyTorch) runs the same loop as DeepSpeed: on a CPU in fp32 the losses,
    the scores and the saved weights agree (only DeepSpeed's flat-buffer gradient sums are ordered differently)."""
    from safetensors.torch import load_file

    from lxmert_fast.finetune import main

    args = ("--from-scratch", "--max-steps", "4", "--epochs", "1", "--log-every", "1")
    runs = {}
    for engine, how in (("deepspeed", "DeepSpeed ZeRO-0"), ("torch", "plain PyTorch")):
        runs[engine] = main(cli(sample, task, tmp_path / engine, *args, "--engine", engine))
        assert how in capsys.readouterr().out
    losses = {engine: [json.loads(line)["loss"] for line in open(tmp_path / engine / "metrics.jsonl")
                       if '"loss"' in line] for engine in runs}
    assert len(losses["torch"]) == 4
    assert losses["torch"] == pytest.approx(losses["deepspeed"], rel=1e-5)
    assert runs["torch"]["valid"] == pytest.approx(runs["deepspeed"]["valid"])
    a, b = (load_file(str(tmp_path / engine / "final_model" / "model.safetensors")) for engine in runs)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


# ------------------------------------------------------------------------------------------ starting points
@pytest.fixture()
def pretrained(tmp_path):
    """A tiny pre-training model over a hand-made 5-answer table, saved as an HF folder and as model_LXRT.pth."""
    table = tmp_path / "all_ans.json"
    table.write_text(json.dumps([{"ans": a, "dsets": ["vqa"]} for a in ("yes", "no", "2", "gray", "dog")]))
    torch.manual_seed(0)
    model = LxmertForPreTraining(LxmertConfig(**TINY, vocab_size=50, num_qa_labels=5))
    with torch.no_grad():  # make biases non-zero so that copied rows are told apart from zeroed ones
        for p in model.answer_head.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    save_original(model.state_dict(), tmp_path / "model_LXRT.pth")
    return model, table, tmp_path


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_load_lxmert_qa_maps_answers_through_the_table(pretrained, capsys, fmt):
    source, table, tmp = pretrained
    path = tmp / "hf" if fmt == "hf" else tmp / "model_LXRT.pth"
    label2ans = ["Two", "grey", "cat", "the dog", "yes", "maybe"]  # matches after normalisation: 2, gray, dog, yes
    model = build_task_model("vqa", load_qa=path, answer_table=table, label2ans=label2ans)
    assert "Loaded 4 answers from LXMERT QA pre-training and 2 not" in capsys.readouterr().out

    src, dst = source.answer_head.logit_fc, model.answer_head.logit_fc
    for i in (0, 2):
        torch.testing.assert_close(dst[i].weight, src[i].weight, rtol=0, atol=0)
        torch.testing.assert_close(dst[i].bias, src[i].bias, rtol=0, atol=0)
    for label, row in {0: 2, 1: 3, 3: 4, 4: 0}.items():
        torch.testing.assert_close(dst[3].weight[label], src[3].weight[row], rtol=0, atol=0)
        assert dst[3].bias[label] == src[3].bias[row]
    for label in (2, 5):
        assert not dst[3].weight[label].any() and dst[3].bias[label] == 0
    enc = source.lxmert.state_dict()
    for key, value in model.lxmert.state_dict().items():
        torch.testing.assert_close(value, enc[key], rtol=0, atol=0, msg=key)


def test_load_takes_the_encoder_only_and_task_checkpoints_whole(pretrained, tmp_path):
    source, table, tmp = pretrained
    torch.manual_seed(1)
    model = build_task_model("vqa", load=tmp / "hf", label2ans=["yes", "no", "2", "gray", "dog"])
    # same number of answers as the pre-training head, but a pre-training checkpoint never fills the task head
    assert not torch.equal(model.answer_head.logit_fc[3].weight, source.answer_head.logit_fc[3].weight)
    torch.testing.assert_close(model.lxmert.pooler.dense.weight, source.lxmert.pooler.dense.weight)

    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    (tuned / LABEL2ANS_FILE).write_text(json.dumps(["yes", "no", "2", "gray", "dog"]))
    again = build_task_model("vqa", load=tuned, label2ans=["yes", "no", "2", "gray", "dog"])
    torch.testing.assert_close(again.answer_head.logit_fc[3].weight, model.answer_head.logit_fc[3].weight)
    with pytest.raises(CheckpointError, match="answer vocabulary"):
        build_task_model("vqa", load=tuned, label2ans=["no", "yes", "2", "gray", "dog"])
    with pytest.raises(ValueError, match="NLVR2"):
        build_task_model("nlvr2", load_qa=tmp / "hf", answer_table=table)
    nlvr2 = build_task_model("nlvr2", load=tmp / "model_LXRT.pth")
    assert isinstance(nlvr2, LxmertForNLVR2)


# ---------------------------------------------------------------------------------------------------- metrics
def test_vqa_score_and_gqa_accuracy_by_hand():
    labels = {1: {"yes": 1.0}, 2: {"2": 0.3, "3": 1.0}, 3: {"blue": 1.0}, 4: {"red": 0.6}}
    predictions = {1: "yes", 2: "2", 3: "red", 4: "red"}
    assert vqa_score(predictions, labels) == pytest.approx((1.0 + 0.3 + 0.0 + 0.6) / 4)
    gqa = {"a": {"dog": 1.0}, "b": {"no": 1.0}, "c": {"red": 1.0}}
    assert gqa_accuracy({"a": "dog", "b": "yes", "c": "red"}, gqa) == pytest.approx(2 / 3)
    assert evaluate("gqa", {"a": "dog", "b": "yes", "c": "red"}, gqa) == {"eval_score": 2 / 3, "accuracy": 2 / 3}
    with pytest.raises(KeyError):
        vqa_score({99: "yes"}, labels)


def test_nlvr2_accuracy_and_consistency_by_hand():
    """Identifiers are split-set-pair-sentence; consistency groups the image pairs of one sentence (the official
    metrics.py blanks the pair field), not the sentences of one image pair."""
    labels = {"dev-1-0-0": 1, "dev-1-1-0": 0, "dev-1-0-1": 1, "dev-1-1-1": 1, "dev-3-0-0": 0, "dev-3-1-0": 1}
    predictions = {"dev-1-0-0": 1, "dev-1-1-0": 0, "dev-1-0-1": 1, "dev-1-1-1": 0, "dev-3-0-0": 0, "dev-3-1-0": 1}
    assert nlvr2_accuracy(predictions, labels) == pytest.approx(5 / 6)
    assert sentence_id("dev-850-0-3") == "dev-850--3"
    # sentences dev-1--0 and dev-3--0 all right, dev-1--1 not; grouping by image pair would give 3/4
    assert nlvr2_consistency(predictions, labels) == pytest.approx(2 / 3)
    metrics = evaluate("nlvr2", predictions, labels)
    assert metrics["eval_score"] == metrics["accuracy"] and metrics["consistency"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="expected split-set-pair-sentence"):
        sentence_id("dev-850-0")


def test_submission_files_parse_back(tmp_path):
    cases = {
        "vqa": {262148000: "yes", 262148001: "2"},
        "gqa": {"20968185": "dog", "201307251": "no"},
        "nlvr2": {"test1-0-1-0": 1, "test1-0-1-1": 0},
    }
    for task, predictions in cases.items():
        path = write_submission(task, predictions, tmp_path / f"{task}.out")
        assert read_submission(task, path) == predictions
    assert json.load(open(tmp_path / "vqa.out")) == [
        {"question_id": 262148000, "answer": "yes"},
        {"question_id": 262148001, "answer": "2"},
    ]
    assert json.load(open(tmp_path / "gqa.out"))[0] == {"questionId": "20968185", "prediction": "dog"}
    assert open(tmp_path / "nlvr2.out").read() == "test1-0-1-0,True\ntest1-0-1-1,False\n"


# ------------------------------------------------------------------------------------------------------ data
def test_nlvr2_pair_is_two_passes_concatenated(sample):
    paths, ft, store = sample["paths"], sample["ft"], sample["store"]
    dataset = NLVR2Dataset(ft.split("nlvr2", "valid"), [store], paths.tokenizer_dir)
    batch = finetune_collate([dataset[i] for i in range(3)])
    assert batch["visual_feats"].shape == (3, 2, 36, 32) and batch["visual_attention_mask"].shape == (3, 2, 36)
    left = store.row(dataset.records[1]["img0"])
    torch.testing.assert_close(batch["visual_feats"][1, 0], torch.from_numpy(store.features[left].astype("float32")))

    torch.manual_seed(0)
    config = LxmertConfig(
        **TINY, vocab_size=len(dataset.tokenizer), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model = LxmertForNLVR2(config, backend="torch").eval()
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        logits = model(
            **text,
            visual_feats=batch["visual_feats"],
            visual_pos=batch["visual_pos"],
            visual_attention_mask=batch["visual_attention_mask"],
        ).logits
        pooled = [
            model.lxmert(
                **text,
                visual_feats=batch["visual_feats"][:, k],
                visual_pos=batch["visual_pos"][:, k],
                visual_attention_mask=batch["visual_attention_mask"][:, k],
            ).pooled_output
            for k in (0, 1)
        ]
        expected = model.logit_fc(torch.cat(pooled, dim=-1))  # (B, 2H) -> (B, 2)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_float16_features_are_the_float32_values_in_half_the_bytes(sample):
    """finetune.py loads features as float16 (the stores' dtype) and casts them on the device: the same values."""
    paths, ft, store = sample["paths"], sample["ft"], sample["store"]
    split = ft.split("nlvr2", "valid")
    full = finetune_collate([NLVR2Dataset(split, [store], paths.tokenizer_dir)[i] for i in range(3)])
    half_set = NLVR2Dataset(split, [store], paths.tokenizer_dir, feature_dtype="float16")
    half = finetune_collate([half_set[i] for i in range(3)])
    assert half["visual_feats"].dtype == torch.float16 and full["visual_feats"].dtype == torch.float32
    assert torch.equal(half["visual_feats"].float(), full["visual_feats"])
    assert all(torch.equal(half[k], full[k]) for k in full if k != "visual_feats")
    with pytest.raises(ValueError, match="feature_dtype"):
        NLVR2Dataset(split, [store], paths.tokenizer_dir, feature_dtype="int8")


def test_text_length_stats_are_those_of_the_questions(sample):
    paths, ft, store = sample["paths"], sample["ft"], sample["store"]
    dataset = NLVR2Dataset(ft.split("nlvr2", "valid"), [store], paths.tokenizer_dir)
    lengths = np.array([dataset[i]["attention_mask"].sum() for i in range(len(dataset))], dtype=np.float64)
    assert dataset.text_length_stats() == pytest.approx((lengths.mean(), lengths.std()))


def test_vqa_dataset_soft_targets_and_unknown_answers(sample, tmp_path, caplog):
    paths, store = sample["paths"], sample["store"]
    img = store.img_ids[0]
    data = [
        {"question_id": 7, "img_id": img, "sent": "what color is the dog?", "label": {"red": 1.0, "pink": 0.3}},
        {"question_id": 8, "img_id": img, "sent": "is there a cat?", "label": {"no": 1.0, "perhaps": 0.3}},
    ]
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(data))
    vocab = AnswerVocab(["yes", "no", "red", "pink"])
    with caplog.at_level("WARNING"):
        dataset = QADataset(path, [store], vocab, paths.tokenizer_dir)
    assert dataset.num_unknown_answers == 1 and "'perhaps'" in caplog.text and "record 1" in caplog.text
    assert dataset[0]["target"].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.3])
    assert dataset[1]["target"].tolist() == [0.0, 1.0, 0.0, 0.0]
    item = dataset[0]
    assert item["input_ids"][0] == dataset.tokenizer.cls_token_id and item["input_ids"].shape == (20,)


@pytest.mark.parametrize(
    "task, record, message",
    [
        ("vqa", {"question_id": 5, "img_id": "IMG", "label": {"yes": 1.0}}, r"record 1 \(question_id 5\).*'sent'"),
        ("vqa", {"question_id": 5, "img_id": "IMG", "sent": "q?", "label": {"yes": -1}}, "invalid score"),
        ("vqa", {"question_id": 1, "img_id": "IMG", "sent": "q?", "label": {}}, "duplicate question_id"),
        ("gqa", {"question_id": "9", "img_id": "nowhere", "sent": "q?", "label": {"yes": 1.0}}, "'nowhere'"),
        ("nlvr2", {"identifier": "dev-1-0-1", "img0": "IMG", "img1": "IMG", "sent": "s", "label": 2}, "0 or 1"),
        ("nlvr2", {"identifier": "dev-1-0-1", "img0": "IMG", "img1": "gone", "sent": "s", "label": 1}, "'gone'"),
    ],
)
def test_bad_records_name_file_and_record(sample, tmp_path, task, record, message):
    paths, store = sample["paths"], sample["store"]
    img = store.img_ids[0]
    first = (
        {"identifier": "dev-1-0-0", "img0": img, "img1": img, "sent": "s", "label": 0}
        if task == "nlvr2"
        else {"question_id": 1, "img_id": img, "sent": "q?", "label": {"yes": 1.0}}
    )
    record = {k: (img if v == "IMG" else v) for k, v in record.items()}
    path = tmp_path / f"{task}_bad.json"
    path.write_text(json.dumps([first, record]))
    with pytest.raises(AnnotationFormatError, match=message) as err:
        if task == "nlvr2":
            NLVR2Dataset(path, [store], paths.tokenizer_dir)
        else:
            QADataset(path, [store], AnswerVocab(["yes", "no"]), paths.tokenizer_dir, task=task)
    assert str(path) in str(err.value) and "record 1" in str(err.value)
