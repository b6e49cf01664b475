"""The happy path says what matters and nothing else: no warning about the project's own sample data or configs,
rounded numbers, counts in the singular where there is one, files others can read, and a missing file, or a folder
of checkpoints given for one, answered with what to do."""

import json
import logging
import os
import stat

import pytest

from lxmert_fast.cli import run
from lxmert_fast.data.download import download_hint
from lxmert_fast.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_sample_labels_hold_only_answers_of_the_vocabulary_so_loading_them_warns_of_nothing(tmp_path, caplog):
    from lxmert_fast.data import FeatureStore, ensure_sample_data
    from lxmert_fast.data.finetune_dataset import AnswerVocab, QADataset
    from lxmert_fast.data.finetune_sample import ensure_finetune_sample

    ft = ensure_finetune_sample(ensure_sample_data(tmp_path / "sample", num_images=40, feat_dim=8))
    store = FeatureStore.from_tsv(ft.features_tsv, progress=False)
    for task in ("vqa", "gqa"):
        vocabulary = set(json.loads(ft.label2ans(task).read_text()))
        for split in ("train", "valid"):
            records = json.loads(ft.split(task, split).read_text())
            assert {a for r in records for a in r["label"]} <= vocabulary, (task, split)
        with caplog.at_level(logging.WARNING):
            data = QADataset(ft.split(task, "train"), [store], AnswerVocab.load(ft.ans2label(task)), ft.tokenizer_dir,
                             task)
        assert data.num_unknown_answers == 0 and "not in the answer vocabulary" not in caplog.text


def test_bertadam_is_declared_to_zero_so_deepspeed_does_not_call_it_untested():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from lxmert_fast.train.engines import declare_zero_safe
    from lxmert_fast.train.optimization import BertAdam

    declare_zero_safe(BertAdam)
    declare_zero_safe(BertAdam)
    assert ZERO_SUPPORTED_OPTIMIZERS.count(BertAdam) == 1


def test_the_final_message_rounds_the_losses():
    from lxmert_fast.train.pretrain_run import _rounded

    assert f"loss {_rounded(64.58026084899902)} -> {_rounded(34.35109753078885)}" == "loss 64.58 -> 34.35"
    assert _rounded(None) == "none"


def test_export_of_a_folder_of_checkpoints_lists_them_and_the_latest(tmp_path, capsys):
    from lxmert_fast.export import main

    checkpoints = tmp_path / "checkpoints"
    for tag in ("step000000004", "step000000008"):
        (checkpoints / tag / "model").mkdir(parents=True)
    (checkpoints / "latest").write_text("step000000008")
    with pytest.raises(SystemExit):
        run(main, [str(checkpoints), str(tmp_path / "out")], prog="export")
    assert (f"{checkpoints} is a folder of checkpoints, not one: it holds step000000004, step000000008 (latest); "
            f"export one, e.g. python -m lxmert_fast.export {checkpoints / 'step000000008'} OUT_DIR"
            ) in capsys.readouterr().err


@pytest.fixture
def group_umask():
    previous = os.umask(0o002)
    yield 0o664
    os.umask(previous)


def test_converted_and_atomically_written_files_honour_the_umask(tmp_path, group_umask):
    import torch

    from lxmert_fast import LxmertConfig
    from lxmert_fast.convert import original_to_hf
    from lxmert_fast.files import atomic_path, write_text
    from lxmert_fast.model.modeling import LxmertForPreTraining
    from lxmert_fast.model.weights import save_original

    config = LxmertConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32, l_layers=1,
                          x_layers=1, r_layers=1, visual_feat_dim=8, num_qa_labels=3)
    save_original(LxmertForPreTraining(config, backend="torch").state_dict(), tmp_path / "model_LXRT.pth", config)
    original_to_hf(tmp_path / "model_LXRT.pth", tmp_path / "converted")
    with atomic_path(tmp_path / "private.bin") as tmp:  # a writer that makes its file 0600, as safetensors does
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    write_text(tmp_path / "text.txt", "x")
    torch.save({}, tmp_path / "unrelated.pt")
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "unrelated.pt"]
    assert {p.name for p in written} >= {"model.safetensors", "config.json", "model_LXRT.pth", "private.bin"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
        p.name: oct(group_umask) for p in written}


def test_a_recipe_without_its_data_lists_the_missing_files_and_the_download(tmp_path, monkeypatch):
    from lxmert_fast.train import pretrain_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        pretrain_run.resolve(["--config", os.path.join(REPO, "configs", "recipe_lxmert_paper.json")])
    message = str(error.value)
    assert message.startswith("no such file or folder: --train-json data/lxmert/mscoco_train.json; ")
    for path in ("data/lxmert/vgnococo.json", "--valid-json data/lxmert/mscoco_minival.json",
                 "--features data/vg_gqa_imgfeat/vg_gqa_obj36.tsv", "--answer-table data/lxmert/all_ans.json"):
        assert path in message
    assert message.endswith("; fetch them with: python -m lxmert_fast.data.download pretrain --dir data")


def test_the_download_hint_names_the_fewest_parts_or_nothing():
    vqa = ["d/vqa/train.json", "d/mscoco_imgfeat/train2014_obj36.tsv", "d/lxmert/all_ans.json"]
    assert download_hint(vqa) == "; fetch them with: python -m lxmert_fast.data.download vqa --dir d"
    assert download_hint([*vqa, "d/gqa/testdev.json"]).endswith("download vqa gqa --dir d")
    assert download_hint([*vqa, "elsewhere/mine.json"]) == ""  # not all release files: no command to offer
    assert download_hint(["a/vqa/train.json", "b/vqa/test.json"]) == ""  # two roots: no one --dir

