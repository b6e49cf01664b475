"""The fine-tuning metrics, as the original's evaluators (`src/tasks/*_data.py`), over the predicted questions:

    vqa_score          mean over questions of the predicted answer's soft score in the label (0 when absent)
    gqa_accuracy       the same formula; GQA labels hold one answer with score 1.0, so it is plain accuracy
    nlvr2_accuracy     fraction of pairs whose predicted truth value (0 / 1) equals the label
    nlvr2_consistency  fraction of sentences whose every pair is right; a sentence is the identifier without its
                       last "-N" part ("dev-850-0-3" -> "dev-850-0"), as the official NLVR2 script

Every predicted id must have a label (KeyError otherwise): a silent 0 would hide a mismatched file. Plain Python:
the task registry (lxmert_fast.tasks.registry) names these functions and loads without torch.
"""

from __future__ import annotations

from collections.abc import Mapping


def _labels_for(predictions: Mapping, labels: Mapping):
    if not predictions:
        raise ValueError("no predictions to evaluate")
    missing = [qid for qid in predictions if qid not in labels]
    if missing:
        raise KeyError(f"{len(missing)} predicted ids have no label, e.g. {missing[:3]}")
    return ((predictions[qid], labels[qid]) for qid in predictions)


def vqa_score(predictions: Mapping, labels: Mapping[object, Mapping[str, float]]) -> float:
    """predictions: question_id -> answer; labels: question_id -> {answer: soft score}."""
    pairs = list(_labels_for(predictions, labels))
    return sum(float(label.get(answer, 0.0)) for answer, label in pairs) / len(pairs)


def gqa_accuracy(predictions: Mapping, labels: Mapping[object, Mapping[str, float]]) -> float:
    """predictions: question_id -> answer; labels: question_id -> {answer: 1.0}."""
    return vqa_score(predictions, labels)


def nlvr2_accuracy(predictions: Mapping[str, int], labels: Mapping[str, int]) -> float:
    """predictions, labels: identifier -> 0 | 1."""
    pairs = list(_labels_for(predictions, labels))
    return sum(int(p) == int(y) for p, y in pairs) / len(pairs)


def sentence_id(identifier: str) -> str:
    """NLVR2 identifier ("split-set-pair-sentence") -> its sentence, as the official metrics.py groups them: the
    pair field blanked, "dev-850-0-3" -> "dev-850--3" (the image pairs "dev-850-0-3" .. "dev-850-3-3" share it)."""
    fields = identifier.split("-")
    if len(fields) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r}: expected split-set-pair-sentence")
    fields[2] = ""
    return "-".join(fields)


def nlvr2_consistency(predictions: Mapping[str, int], labels: Mapping[str, int]) -> float:
    """Fraction of sentences all of whose (predicted) image pairs are right (the official NLVR2 consistency)."""
    _labels_for(predictions, labels)
    all_right: dict[str, bool] = {}
    for identifier, p in predictions.items():
        sid = sentence_id(identifier)
        all_right[sid] = all_right.get(sid, True) and int(p) == int(labels[identifier])
    return sum(all_right.values()) / len(all_right)


__all__ = ["gqa_accuracy", "nlvr2_accuracy", "nlvr2_consistency", "sentence_id", "vqa_score"]
