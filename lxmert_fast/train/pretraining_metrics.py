"""Pre-training validation accuracies: does the model match sentences to images, and does it use the image?

The losses alone cannot tell: a matching loss of ln 2 (0.693) is chance, and a falling masked-LM loss may come from
the sentence alone. So, on a validation batch:
    matched       image-sentence matching accuracy (the batch's own 50% mismatched pairs; chance 0.5)
    mlm           masked-word accuracy over every masked word
    object        masked-word accuracy over the masked words of a group (``word_groups``, e.g. the words that name an
                  object: ``object_word_ids``), on the matched pairs only (a mismatched sentence is about another
                  image); one such count per group, under the group's name
    object_images_shuffled
                  the same words, with every sentence shown another image of the batch (the batch's images rolled
                  by one): a model that uses the image predicts object words better with the true one

Counts stay on the device as (2,) tensors [right, total] (no host sync per batch), so batches and ranks add up
before dividing.

Public API
    word_token_ids(tokenizer, words) -> list[int]            the ids of the words that are one token each
    object_word_ids(features, tokenizer) -> list[int]        ids of the detector's class names (objects_vocab.txt
                                                             beside the features; [] without one)
    count_names(task_matched, word_groups) -> list[str]      the names pretraining_counts returns, in order
    pretraining_counts(model, batch, word_groups) -> counts  two forward passes (true and shuffled images)
    matching_counts(matched_logits, matched_label); masked_word_counts(lm_logits, labels, name, keep_ids, rows)
    roll_images(batch) -> batch                              every sentence with the next item's image
    add_counts(total, counts) -> total; summed_counts(total, names) -> {name: (right, total)} over all ranks
    accuracies(counts) -> {name: right / total}
"""

from __future__ import annotations

import torch

from lxmert_fast.model.static_shapes import IGNORE_INDEX
from lxmert_fast.train.distributed import world_size

VISUAL_INPUTS = ("visual_feats", "visual_pos", "visual_attention_mask")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids") + VISUAL_INPUTS


def word_token_ids(tokenizer, words) -> list[int]:
    """The vocabulary ids of ``words`` that the tokenizer keeps whole (one token each)."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            ids.append(pieces[0])
    return sorted(set(ids))


def object_word_ids(features, tokenizer) -> list[int]:
    """The token ids of every name (synonyms included) in the detector vocabulary beside the feature files (the
    sample data writes one; Visual Genome's objects_vocab.txt has "name,synonym" lines), [] when there is none."""
    from lxmert_fast.use.attention import objects_vocab_beside, read_object_synonyms

    path = objects_vocab_beside(features) if features else None
    if path is None:
        return []
    return word_token_ids(tokenizer, [name for names in read_object_synonyms(path) for name in names if name])


def matching_counts(matched_logits: torch.Tensor, matched_label: torch.Tensor) -> dict:
    """{"matched": [right, pairs]}: the matching head's argmax against the 0 / 1 labels."""
    right = (matched_logits.argmax(-1) == matched_label).sum()
    return {"matched": torch.stack([right, torch.tensor(matched_label.numel(), device=right.device)])}


def masked_word_counts(lm_logits, labels, name: str, keep_ids=None, rows=None) -> dict:
    """{name: [right, masked words]}: the LM head's argmax at the masked positions (labels != -100), only those
    whose true word is in ``keep_ids`` when given, only the batch rows where ``rows`` is True when given."""
    masked = labels != IGNORE_INDEX  # (B, L)
    if keep_ids is not None:
        masked &= torch.isin(labels, torch.as_tensor(keep_ids, device=labels.device))
    if rows is not None:
        masked &= rows.bool()[:, None]
    right = ((lm_logits.argmax(-1) == labels) & masked).sum()
    return {name: torch.stack([right, masked.sum()])}


def roll_images(batch: dict) -> dict:
    """The batch with every item's visual inputs taken from the next item (the last from the first). Two items of
    one image stay together only if the batch holds them side by side, which makes the shuffled score, if anything,
    too high."""
    return {**batch, **{k: torch.roll(batch[k], 1, dims=0) for k in VISUAL_INPUTS}}


def count_names(task_matched: bool, word_groups: dict, task_mask_lm: bool = True) -> list[str]:
    names = (["matched"] if task_matched else []) + (["mlm"] if task_mask_lm else [])
    for name in word_groups:
        names += [name, f"{name}_images_shuffled"]
    return names


@torch.no_grad()
def pretraining_counts(model, batch: dict, word_groups: dict) -> dict:
    """Matching and masked-word counts of ``model`` (an LxmertForPreTraining, in eval mode) on a batch of its
    forward's keyword arguments, plus, for each ``word_groups`` entry {name: token ids}, its words with the true and
    with rolled images (see the module docstring). The names are count_names(...)'s."""
    out = model(**{k: batch[k] for k in MODEL_INPUTS}, return_dict=True)
    labels, matched = batch["labels"], batch.get("matched_label")  # None: no matching task, every pair matched
    counts = {}
    if model.config.task_matched:
        counts.update(matching_counts(out.cross_relationship_score, matched))
    if model.config.task_mask_lm:
        counts.update(masked_word_counts(out.prediction_logits, labels, "mlm"))
    if word_groups:
        shuffled = model(**{k: v for k, v in roll_images(batch).items() if k in MODEL_INPUTS}, return_dict=True)
    for name, ids in word_groups.items():
        counts.update(masked_word_counts(out.prediction_logits, labels, name, ids, rows=matched))
        counts.update(masked_word_counts(shuffled.prediction_logits, labels, f"{name}_images_shuffled", ids,
                                         rows=matched))
    return counts


def add_counts(total: dict, counts: dict) -> dict:
    for name, pair in counts.items():
        total[name] = total[name] + pair if name in total else pair
    return total


def summed_counts(total: dict, names: list[str], device=None) -> dict:
    """{name: (right, total)} for ``names`` (a name no batch counted: 0, 0), summed over the ranks: every rank
    calls it with the same names, whatever batches it saw."""
    vec = torch.zeros(len(names), 2, dtype=torch.long, device=device)
    for i, name in enumerate(names):
        if name in total:
            vec[i] = total[name].to(vec.device)
    if world_size() > 1:
        torch.distributed.all_reduce(vec)
    return {name: (int(r), int(s)) for name, (r, s) in zip(names, vec.tolist(), strict=True)}


def accuracies(counts: dict) -> dict:
    """{name: right / total} for the names with at least one case."""
    return {name: right / seen for name, (right, seen) in counts.items() if seen}
