"""Small configs and random batches shared by the model tests."""

import torch
import transformers

# Small configs: odd hidden sizes per head, uneven layer counts, tiny label spaces; dropout off for exact parity.
SMALL_CONFIGS = {
    "tiny": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=1, x_layers=1, r_layers=1),
    "uneven": dict(hidden_size=48, num_attention_heads=3, intermediate_size=80, l_layers=3, x_layers=2, r_layers=1),
    "one-head": dict(hidden_size=40, num_attention_heads=1, intermediate_size=72, l_layers=2, x_layers=1, r_layers=2),
}
SMALL_LABELS = dict(
    visual_feat_dim=24,
    vocab_size=103,
    num_qa_labels=11,
    num_object_labels=13,
    num_attr_labels=7,
    max_position_embeddings=64,
)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def small_config(name="uneven", **overrides) -> transformers.LxmertConfig:
    return transformers.LxmertConfig(**{**SMALL_CONFIGS[name], **SMALL_LABELS, **NO_DROPOUT, **overrides})


def make_batch(config, batch=3, text_len=9, objects=5, seed=0, padded=True, targets=True):
    """Inputs (and pre-training targets) with padding on both streams and both token types."""
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(batch, text_len)
    visual_attention_mask = torch.ones(batch, objects)
    if padded:
        for row in range(1, batch):
            attention_mask[row, max(2, text_len - 3 * row) :] = 0
        visual_attention_mask[0, max(1, objects - 2) :] = 0
    inputs = dict(
        input_ids=torch.randint(1, config.vocab_size, (batch, text_len), generator=g),
        visual_feats=torch.randn(batch, objects, config.visual_feat_dim, generator=g),
        visual_pos=torch.rand(batch, objects, config.visual_pos_dim, generator=g),
        attention_mask=attention_mask,
        visual_attention_mask=visual_attention_mask,
        token_type_ids=torch.randint(0, 2, (batch, text_len), generator=g),
    )
    if targets:
        labels = torch.full((batch, text_len), -100)
        labels[:, 1] = torch.randint(0, config.vocab_size, (batch,), generator=g)
        labels[0, 2] = 3
        inputs.update(
            labels=labels,
            obj_labels={
                "obj": (
                    torch.randint(0, config.num_object_labels, (batch, objects), generator=g),
                    torch.rand(batch, objects, generator=g),
                ),
                "attr": (
                    torch.randint(0, config.num_attr_labels, (batch, objects), generator=g),
                    torch.rand(batch, objects, generator=g),
                ),
                "feat": (
                    torch.randn(batch, objects, config.visual_feat_dim, generator=g),
                    (torch.rand(batch, objects, generator=g) < 0.4).float(),
                ),
            },
            matched_label=torch.randint(0, 2, (batch,), generator=g),
            ans=torch.tensor([1, -100] + [2] * (batch - 2))[:batch],
        )
    return inputs


def model_inputs(batch):
    """Only the encoder's inputs of a batch made by make_batch."""
    keys = ("input_ids", "visual_feats", "visual_pos", "attention_mask", "visual_attention_mask", "token_type_ids")
    return {key: batch[key] for key in keys}
