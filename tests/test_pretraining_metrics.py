"""The pre-training validation accuracies: matching, masked words, object words with the images rolled."""

import pytest
import torch

from lxmert_fast import LxmertConfig, LxmertForPreTraining
from lxmert_fast.train.objectives import describe
from lxmert_fast.train.pretraining_metrics import (
    accuracies,
    add_counts,
    count_names,
    masked_word_counts,
    matching_counts,
    object_word_ids,
    pretraining_counts,
    roll_images,
    summed_counts,
    word_token_ids,
)


def _pairs(counts):
    return {name: tuple(pair.tolist()) for name, pair in counts.items()}


def test_matching_counts_the_argmax_against_the_labels():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.5, 0.2]])  # says 0, 1, 0, 0
    assert _pairs(matching_counts(logits, torch.tensor([0, 1, 1, 1]))) == {"matched": (2, 4)}


def test_masked_word_counts_only_masked_kept_words_of_the_rows_asked():
    labels = torch.tensor([[-100, 5, 7, -100], [6, -100, 5, -100]])
    logits = torch.zeros(2, 4, 10)
    logits[0, 1, 5] = logits[0, 2, 3] = logits[1, 0, 6] = logits[1, 2, 5] = 1.0  # right, wrong, right, right
    assert _pairs(masked_word_counts(logits, labels, "mlm")) == {"mlm": (3, 4)}
    assert _pairs(masked_word_counts(logits, labels, "object", keep_ids=[5, 7])) == {"object": (2, 3)}
    assert _pairs(masked_word_counts(logits, labels, "object", [5, 7], rows=torch.tensor([1, 0]))) == {
        "object": (1, 2)}


def test_counts_add_up_before_dividing():
    total = add_counts({}, {"matched": torch.tensor([1, 2]), "mlm": torch.tensor([0, 0])})
    total = add_counts(total, {"matched": torch.tensor([3, 4])})
    names = count_names(True, {"object": [7]})
    assert names == ["matched", "mlm", "object", "object_images_shuffled"]
    summed = summed_counts(total, names)  # a name no batch counted: 0 of 0, so every rank sends the same vector
    assert summed == {"matched": (4, 6), "mlm": (0, 0), "object": (0, 0), "object_images_shuffled": (0, 0)}
    assert accuracies(summed) == {"matched": pytest.approx(4 / 6)}  # no cases: left out, not 0/0


def test_describe_names_each_accuracy_and_its_shuffled_twin():
    text = describe({"matched": 0.74, "mlm": 0.5, "object": 0.61, "object_images_shuffled": 0.23})
    assert text == (", matching 0.740, masked words 0.500, object words 0.610 (0.230 with the images shuffled)")
    assert describe({}) == ""


def test_roll_images_gives_each_sentence_the_next_items_image():
    batch = {"input_ids": torch.arange(3)[:, None], "visual_feats": torch.arange(3.0)[:, None, None],
             "visual_pos": torch.arange(3.0)[:, None, None], "visual_attention_mask": torch.ones(3, 1)}
    rolled = roll_images(batch)
    assert rolled["input_ids"].flatten().tolist() == [0, 1, 2]
    assert rolled["visual_feats"].flatten().tolist() == rolled["visual_pos"].flatten().tolist() == [2.0, 0.0, 1.0]


class _WholeWords:
    def __call__(self, word, add_special_tokens=False):
        return {"input_ids": [len(word)] if word.isalpha() else [1, 2]}


def test_word_token_ids_keeps_the_single_token_words():
    assert word_token_ids(_WholeWords(), ["dog", "cat", "tv-set", "horse"]) == [3, 5]


def test_object_word_ids_read_every_synonym_beside_the_features(tmp_path):
    features = tmp_path / "feats.tsv"
    features.write_text("")
    assert object_word_ids(str(features), _WholeWords()) == []  # no detector vocabulary: no object group
    (tmp_path / "objects_vocab.txt").write_text("dog,puppy\ntv-set\nhorse\n")
    assert object_word_ids(str(features), _WholeWords()) == [3, 5]  # dog, horse (5 letters), puppy (5): tv-set


def test_pretraining_counts_of_a_tiny_model():
    config = LxmertConfig(vocab_size=20, hidden_size=16, num_attention_heads=2, intermediate_size=32, l_layers=1,
                          x_layers=1, r_layers=1, visual_feat_dim=8, num_qa_labels=3, num_object_labels=5,
                          num_attr_labels=4, max_position_embeddings=16)
    torch.manual_seed(0)
    model = LxmertForPreTraining(config).eval()
    labels = torch.full((4, 6), -100)
    labels[:, 2] = torch.tensor([7, 8, 9, 7])  # one masked word per sentence; 7 and 8 name objects
    batch = {"input_ids": torch.randint(5, 20, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "token_type_ids": torch.zeros(4, 6, dtype=torch.long), "visual_feats": torch.rand(4, 3, 8),
             "visual_pos": torch.rand(4, 3, 4), "visual_attention_mask": torch.ones(4, 3, dtype=torch.long),
             "labels": labels, "matched_label": torch.tensor([1, 1, 0, 1])}
    counts = pretraining_counts(model, batch, {"object": [7, 8]})
    counts = _pairs(counts)
    assert {k: seen for k, (_, seen) in counts.items()} == {"matched": 4, "mlm": 4, "object": 3,
                                                            "object_images_shuffled": 3}
    assert all(0 <= right <= seen for right, seen in counts.values())
    assert list(counts) == count_names(True, {"object": [7, 8]})
