"""Pre-training validation accuracies: does the model match sentences to images, and does it use the image?

The losses alone cannot tell: a matching loss of ln 2 (0.693) is chance, and a falling masked-LM loss may come from
the sentence alone. So, on a validation batch:
    matched       image-sentence matching accuracy (the batch's own 50% mismatched pairs; chance 0.5)
    mlm           masked-word accuracy over every masked word
    object        masked-word accuracy over the masked words of a group (``word_groups``, e.g. the words that name an
                  object: ``word_token_ids``), on the matched pairs only (a mismatched sentence is about another
                  image); one such count per group, under the group's name
    object_images_shuffled
                  the same words, with every sentence shown another image of the batch (the batch's images rolled
                  by one): a model that uses the image predicts object words better with the true one

Each function returns counts, {name: (correct, total)}, so batches and ranks add up before dividing.

Public API
    word_token_ids(tokenizer, words) -> list[int]            the ids of the words that are one token each
    matching_counts(matched_logits, matched_label) -> counts
    masked_word_counts(lm_logits, labels, name, keep_ids=None, rows=None) -> counts
    roll_images(batch) -> batch                              every sentence with the next item's image
    pretraining_counts(model, batch, word_groups) -> counts  two forward passes (true and shuffled images)
    add_counts(total, counts) -> total; accuracies(counts) -> {name: correct / total}
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
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


def matching_counts(matched_logits: torch.Tensor, matched_label: torch.Tensor) -> dict:
    """{"matched": (right, pairs)}: the matching head's argmax against the 0 / 1 labels."""
    right = (matched_logits.argmax(-1) == matched_label).sum().item()
    return {"matched": (int(right), int(matched_label.numel()))}


def masked_word_counts(lm_logits, labels, name: str, keep_ids=None, rows=None) -> dict:
    """{name: (right, masked words)}: the LM head's argmax at the masked positions (labels != -100), only those
    whose true word is in ``keep_ids`` when given, only the batch rows where ``rows`` is True when given."""
    masked = labels != IGNORE_INDEX  # (B, L)
    if keep_ids is not None:
        masked &= torch.isin(labels, torch.as_tensor(keep_ids, device=labels.device))
    if rows is not None:
        masked &= rows.bool()[:, None]
    right = (lm_logits.argmax(-1) == labels)[masked].sum().item()
    return {name: (int(right), int(masked.sum().item()))}


def roll_images(batch: dict) -> dict:
    """The batch with every item's visual inputs taken from the next item (the last from the first). Two items of
    one image stay together only if the batch holds them side by side, which makes the shuffled score, if anything,
    too high."""
    return {**batch, **{k: torch.roll(batch[k], 1, dims=0) for k in VISUAL_INPUTS}}


@torch.no_grad()
def pretraining_counts(model, batch: dict, word_groups: dict) -> dict:
    """Matching and masked-word counts of ``model`` (an LxmertForPreTraining, in eval mode) on a collated batch,
    plus, for each ``word_groups`` entry {name: token ids}, its words with the true and with rolled images (see
    the module docstring)."""
    out = model(**{k: batch[k] for k in MODEL_INPUTS}, return_dict=True)
    shuffled = model(**{k: v for k, v in roll_images(batch).items() if k in MODEL_INPUTS}, return_dict=True)
    labels, matched = batch["labels"], batch["matched_label"]
    counts = {}
    if model.config.task_matched:
        counts.update(matching_counts(out.cross_relationship_score, matched))
    counts.update(masked_word_counts(out.prediction_logits, labels, "mlm"))
    for name, ids in word_groups.items():
        counts.update(masked_word_counts(out.prediction_logits, labels, name, ids, rows=matched))
        counts.update(masked_word_counts(shuffled.prediction_logits, labels, f"{name}_images_shuffled", ids,
                                         rows=matched))
    return counts


def add_counts(total: dict, counts: dict) -> dict:
    for name, (right, seen) in counts.items():
        r, s = total.get(name, (0, 0))
        total[name] = (r + right, s + seen)
    return total


def accuracies(counts: dict) -> dict:
    """{name: right / total} for the names with at least one case."""
    return {name: right / seen for name, (right, seen) in counts.items() if seen}
