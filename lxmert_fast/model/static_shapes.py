"""Static shapes for a compiled or CUDA-graphed step: how many rows the model's data-dependent parts get.

Two parts of LXMERT's forward have a size that depends on the data: the text stream without its padding (token-wise
layers run on the real tokens only) and the language-model head at the masked tokens only. Eagerly the model finds
those rows with ``nonzero``, exactly. A torch.compile trace or a CUDA graph needs sizes fixed in advance, so a run
that compiles or graphs its step fixes them once, from the data's statistics, in one ``StaticShapes``, and passes
it to the model's forward as ``static_shapes=``. The model then packs the text stream to ``text_rows`` rows and
runs the LM head on ``lm_label_rows`` rows, the real or labelled positions first and the rest as filler that nothing
real reads: the same result as the eager path for every batch that fits.

Whether a batch fits is asked on the host, before the batch moves (``fits`` / ``why_not``), so the check costs no
synchronisation. A batch that does not fit is run without static shapes (eagerly, exact); the model never cuts or
poisons a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

IGNORE_INDEX = -100  # the label of a position without a target: transformers' (and torch's); the original used -1


def _rows(expected: float, std: float, positions: int) -> int:
    """Rows that a count with this mean and standard deviation essentially never exceeds: ten standard deviations
    above the mean, rounded up to a multiple of 64 (whole GEMM tiles), at most every position."""
    return min(positions, 64 * math.ceil((expected + 10 * std) / 64))


@dataclass(frozen=True)
class StaticShapes:
    """The fixed row counts of a static-shape forward. ``None``: every position (no packing / the LM head on every
    token), which always fits."""

    text_rows: int | None = None  # real (unpadded) text tokens in the whole batch
    lm_label_rows: int | None = None  # masked-LM labelled tokens in the whole batch

    @classmethod
    def from_statistics(cls, batch_size: int, text_length: int, mean_length: float, std_length: float,
                        mask_rate: float | None = None) -> StaticShapes:
        """The shapes of a run whose batches are ``batch_size`` x ``text_length`` tokens, given the data's text
        lengths ([CLS] and [SEP] included; mean and standard deviation over the data set, e.g. the datasets'
        ``text_length_stats()``) and, for pre-training, the masking rate of the language model.

        text_rows: B * mean + 10 * sqrt(B) * std; lm_label_rows: the masked tokens expected if every position could
        be masked plus ten standard deviations (1,024 rows of 5,120 at batch 256 x 20 tokens); both rounded up to
        64 and at most every position."""
        positions = batch_size * text_length
        text_rows = _rows(batch_size * mean_length, math.sqrt(batch_size) * std_length, positions)
        lm_rows = None
        if mask_rate is not None:
            lm_rows = _rows(mask_rate * positions, math.sqrt(positions * mask_rate * (1 - mask_rate)), positions)
        return cls(text_rows=text_rows, lm_label_rows=lm_rows)

    def why_not(self, batch) -> str | None:
        """Why ``batch`` (a dict with ``attention_mask`` and, for pre-training, ``labels``; best on the CPU) does
        not fit these shapes, or None when it does."""
        mask = batch.get("attention_mask")
        if self.text_rows is not None and mask is not None and (real := int(mask.sum())) > self.text_rows:
            return f"{real} real text tokens, more than the {self.text_rows} static text rows"
        labels = batch.get("labels")
        if self.lm_label_rows is not None and labels is not None:
            labelled = int((labels != IGNORE_INDEX).sum())
            if labelled > self.lm_label_rows:
                return f"{labelled} masked tokens, more than the {self.lm_label_rows} static LM-head rows"
        return None

    def fits(self, batch) -> bool:
        return self.why_not(batch) is None

    def repeated(self, times: int) -> StaticShapes:
        """The shapes of a batch whose text is repeated ``times`` times (NLVR2 reads each sentence twice)."""
        return replace(
            self,
            text_rows=None if self.text_rows is None else times * self.text_rows,
            lm_label_rows=None if self.lm_label_rows is None else times * self.lm_label_rows,
        )
