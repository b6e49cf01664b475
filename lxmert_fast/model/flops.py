"""FLOPs per LXMERT pre-training sample, counted from the config and the sequence lengths (never typed in).

Convention (the usual one for MFU, as in the PaLM paper's appendix): only matrix products count, one multiply-add is
2 FLOPs; LayerNorm, softmax, GeLU, dropout and the losses add well under 1% at these sizes and are left out.
Backward costs 2x forward for a product whose input needs a gradient (input gradient + weight gradient) and 1x where
the input is data: the visual feature and box projections get weight gradients only.

At the paper's shapes (20 tokens, 36 objects, base config) this gives 35.4 GFLOP forward+backward per sample with the
language-model head at all 20 tokens (as transformers evaluates it) and 32.9 GFLOP with it only at the 15% masked
tokens (3 of 20), often quoted as "about 32".

    python -m lxmert_fast.model.flops     prints the breakdown
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The paper's schedule: 20 epochs ~ 670K steps at batch 256, 10 days on 4 Titan Xp.
PAPER_STEPS = 670_000
PAPER_BATCH = 256
PAPER_DAYS = 10
PAPER_SAMPLES = PAPER_STEPS * PAPER_BATCH
PAPER_SAMPLES_PER_S = PAPER_SAMPLES / (PAPER_DAYS * 86400)  # 198.5, on 4 Titan Xp
MASK_PROB = 0.15


@dataclass
class FlopCount:
    """Forward and backward FLOPs of one sample, per component (embeddings, encoders, heads)."""

    forward: dict[str, float] = field(default_factory=dict)
    backward: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, macs: float, input_grad: bool = True) -> None:
        flops = 2.0 * macs
        self.forward[name] = self.forward.get(name, 0.0) + flops
        self.backward[name] = self.backward.get(name, 0.0) + flops * (2.0 if input_grad else 1.0)

    @property
    def forward_total(self) -> float:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> float:
        return sum(self.backward.values())

    @property
    def total(self) -> float:
        return self.forward_total + self.backward_total


def _layer_macs(n: int, hidden: int, intermediate: int) -> float:
    """One BERT layer (self-attention + FFN) over n tokens: Q, K, V, output projections, two FFN products, and the
    two attention products (scores and weighted values), summed over heads."""
    return n * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * n * n * hidden


def _cross_layer_macs(n_lang: int, n_visn: int, hidden: int, intermediate: int) -> float:
    """One cross-modality layer: the shared cross-attention in both directions (every token is projected to Q, K, V
    once per direction and through the output dense once), then self-attention and FFN on each stream."""
    n = n_lang + n_visn
    cross = 4 * hidden * hidden * n + 2 * 2 * n_lang * n_visn * hidden
    self_att = 4 * hidden * hidden * n + 2 * (n_lang**2 + n_visn**2) * hidden
    ffn = 2 * hidden * intermediate * n
    return cross + self_att + ffn


def count_flops(
    config,
    text_len: int = 20,
    num_objects: int = 36,
    lm_tokens: float | None = None,
    feat_objects: float | None = None,
    qa: bool | None = None,
) -> FlopCount:
    """FLOPs of one sample of ``LxmertForPreTraining`` with the given config (a ``LxmertConfig``).

    lm_tokens: positions where the LM head runs (default: all ``text_len``); fractional values are expectations.
    feat_objects: objects where the feature-regression decoder runs (default: all); the object and attribute
        classifiers always run on all objects (their loss covers all 36).
    qa: count the answer head (default: ``config.task_qa``).
    """
    h, inter = config.hidden_size, config.intermediate_size
    lm_tokens = text_len if lm_tokens is None else lm_tokens
    feat_objects = num_objects if feat_objects is None else feat_objects
    qa = config.task_qa if qa is None else qa

    c = FlopCount()
    c.add("visual_embedding", num_objects * (config.visual_feat_dim + config.visual_pos_dim) * h, input_grad=False)
    c.add("language_layers", config.l_layers * _layer_macs(text_len, h, inter))
    c.add("relationship_layers", config.r_layers * _layer_macs(num_objects, h, inter))
    c.add("cross_layers", config.x_layers * _cross_layer_macs(text_len, num_objects, h, inter))
    c.add("pooler", h * h)
    if config.task_mask_lm:
        c.add("lm_head", lm_tokens * (h * h + h * config.vocab_size))  # transform + decoder tied to the embeddings
    if config.task_matched:
        c.add("match_head", 2 * h)
    if config.task_obj_predict:
        classes = config.num_object_labels * config.visual_obj_loss + config.num_attr_labels * config.visual_attr_loss
        feat = config.visual_feat_dim if config.visual_feat_loss else 0
        c.add("object_head", num_objects * (h * h + h * classes) + feat_objects * h * feat)
    if qa:
        c.add("answer_head", h * 2 * h + 2 * h * config.num_qa_labels)
    return c


def pretraining_flops_per_sample(
    config=None, text_len: int = 20, num_objects: int = 36, lm_head: str = "masked", mask_prob: float = MASK_PROB
) -> float:
    """Forward+backward FLOPs of one pre-training sample.

    lm_head="masked": the LM head only at the masked tokens (``mask_prob * text_len`` of them), as lxmert_fast does;
    "all": at every token, as transformers does.
    """
    if config is None:
        from lxmert_fast.model.configuration import LxmertConfig

        config = LxmertConfig()
    if lm_head not in ("masked", "all"):
        raise ValueError(f"lm_head must be 'masked' or 'all', not {lm_head!r}")
    lm_tokens = mask_prob * text_len if lm_head == "masked" else text_len
    return count_flops(config, text_len, num_objects, lm_tokens=lm_tokens).total


def mfu(samples_per_s: float, flops_per_sample: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    return samples_per_s * flops_per_sample / peak_flops


def paper_schedule_hours(samples_per_s: float) -> float:
    """Hours to process the paper's 670K steps x 256 samples at this throughput."""
    return PAPER_SAMPLES / samples_per_s / 3600.0


def _main() -> None:
    from lxmert_fast.model.configuration import LxmertConfig

    config = LxmertConfig()
    for name, lm_head in (("LM head at masked tokens", "masked"), ("LM head at all 20 tokens", "all")):
        tokens = MASK_PROB * 20 if lm_head == "masked" else 20
        c = count_flops(config, 20, 36, lm_tokens=tokens)
        print(f"{name}: {c.total / 1e9:.2f} GFLOP fwd+bwd per sample ({c.forward_total / 1e9:.2f} forward)")
        for part, fwd in c.forward.items():
            print(f"  {part:20s} fwd {fwd / 1e9:7.3f}  bwd {c.backward[part] / 1e9:7.3f} GFLOP")
    print(f"paper: {PAPER_SAMPLES_PER_S:.1f} samples/s on 4 Titan Xp ({PAPER_DAYS} days)")


if __name__ == "__main__":
    _main()
