"""LXMERT, one file, top to bottom: embeddings -> language / relationship / cross-modality layers -> heads.

A drop-in for transformers' LXMERT classes: the same constructor config, forward keywords, outputs and parameter
names (so ``load_state_dict(hf_model.state_dict(), strict=True)`` works both ways). Two interchangeable paths:

- ``backend="torch"``: plain PyTorch, the reference the kernels are tested against. Attention uses
  ``F.scaled_dot_product_attention`` unless attention probabilities are requested.
- ``backend="triton"``: the fused kernels of ``lxmert_fast.kernels`` for every residual+LayerNorm, the
  bidirectional cross-attention and the RoI-position embedding.
- ``backend="auto"``: triton for CUDA inputs while torch.compile traces, torch otherwise.

The backend is fixed when the model is built: ``backend=`` if given, else the environment variable
``LXMERT_FAST_BACKEND`` (read then, once), else "auto". Each fused module decides from it and its input's device
at call time, without storing anything, so a forward never changes the model's state.

The models are ``transformers.PreTrainedModel`` subclasses: loading, saving, the hub, resizing, gradient
checkpointing and the rest are transformers' own code.

Shapes: B batch, L text tokens, V visual objects, H heads, D head size, C hidden size, F RoI-feature size.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.lxmert.modeling_lxmert import (
    LxmertForPreTrainingOutput,
    LxmertForQuestionAnsweringOutput,
    LxmertModelOutput,
)
from transformers.utils import ModelOutput

from lxmert_fast.model.checks import check_model_folder, check_model_sizes
from lxmert_fast.model.configuration import LxmertConfig
from lxmert_fast.model.static_shapes import IGNORE_INDEX, StaticShapes

BACKENDS = ("auto", "torch", "triton")


def backend_from_environment() -> str:
    """The backend a model gets when none is passed: ``LXMERT_FAST_BACKEND`` if set, else "auto"."""
    backend = os.environ.get("LXMERT_FAST_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"LXMERT_FAST_BACKEND={backend!r}: expected one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into "torch" or "triton" for inputs on `device` (a pure function: nothing is stored)."""
    if backend == "auto":
        # The fused kernels win only without Python launch overhead. Measured on an H100 (bf16, batch 256, training
        # step, benchmarks/profile_step.py): eager, torch 107 ms vs triton 154 ms; torch.compile + CUDA graph,
        # torch 42.7 ms vs triton 40.7 ms. So: triton on CUDA while torch.compile traces, torch otherwise. For a
        # CUDA-graphed eager step (lxmert_fast.train.cuda_graphs) pass backend="triton": 48 ms vs 58 ms.
        return "triton" if device.type == "cuda" and torch.compiler.is_compiling() else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before lxmert_fast.kernels is imported, "
            "to run the kernels on the CPU under Triton's interpreter); use backend='torch' on the CPU"
        )
    return backend


def _kernels():
    # Imported lazily: triton is optional, and TRITON_INTERPRET must be set before the kernels are defined.
    from lxmert_fast.kernels import ops as kernels

    return kernels


def shapes_may_follow_data() -> bool:
    """False while torch.jit.trace, torch.compile / torch.export or a CUDA-graph capture records the model: a shape
    that depends on the data (packing the padded text away, the LM head at labelled tokens only) cannot be recorded
    then. Without ``static_shapes`` the model then runs the text padded and the LM head on every token: the same
    values at every real token and the same losses, only computed on more rows."""
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or capturing)


def true_first(flags: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` positions of a flat bool tensor when those holding True come first, each group in its
    order (what a stable argsort of ~flags gives). Built from running counts and one scatter instead of a sort:
    shapes static, no host synchronisation, nothing that CUDA-graph capture might refuse."""
    ones = flags.to(torch.int64)
    slot = torch.where(flags, ones.cumsum(0), ones.sum() + (1 - ones).cumsum(0)) - 1  # a permutation of 0..n-1
    order = torch.empty_like(slot).scatter_(0, slot, torch.arange(flags.numel(), device=flags.device))
    return order[:count]


class Stream(NamedTuple):
    """How one token stream (language or vision) is masked and laid out.

    Padded text tokens can be removed from the language stream ("packed"): token-wise work (every linear layer,
    LayerNorm, GeLU) then runs on the N real tokens only, (N, C) instead of (B, L, C); attention unpacks queries,
    keys and values to (B, L, ...) and masks the padding as usual. Real tokens get exactly the same values.

    With static shapes (``StaticShapes``, for torch.compile and CUDA graphs) N cannot depend on the data: the
    stream is then packed to a fixed ``rows``, the real tokens first (``true_first``) and padded positions as filler,
    whose values nothing real attends to; with ``rows`` None it is not packed. The caller checks on the host that
    the batch fits (``StaticShapes.fits``).
    """

    keep: torch.Tensor | None  # (B, L) bool, True = real token; None = no mask given
    additive: torch.Tensor | None  # (B, 1, 1, L): 0 or finfo(dtype).min, added to attention scores (transformers')
    index: torch.Tensor | None  # (N,) positions of the packed rows in the flattened (B * L); None = not packed
    batch: int
    length: int

    @staticmethod
    def make(mask, batch, length, dtype, pack=False, static=False, rows=None) -> Stream:
        """``static``: shapes fixed in advance, the stream packed to ``rows`` (None: not packed)."""
        if mask is None:
            return Stream(None, None, None, batch, length)
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        keep = mask.bool()
        index = None
        if pack and static:
            if rows is not None and rows < keep.numel():
                index = true_first(keep.flatten(), rows)
        elif pack and not bool(keep.all()):
            index = keep.flatten().nonzero().squeeze(1)
        return Stream(keep, additive, index, batch, length)

    def pack(self, x):
        """(B, L, ...) -> (N, ...) when packed."""
        return x if self.index is None else x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x):
        """(N, ...) -> (B, L, ...) with zeros at the padding, when packed."""
        if self.index is None:
            return x
        padded = x.new_zeros((self.batch * self.length, *x.shape[1:])).index_copy(0, self.index, x)
        return padded.unflatten(0, (self.batch, self.length))


class Dropout(nn.Dropout):
    """nn.Dropout, with a faster mask on the CPU: torch's CPU ``bernoulli_`` takes about twice as long as drawing
    uniform floats, and dropout was 7% of a CPU training step. The mask is ``rand >= p``, as CUDA's fused dropout
    draws it, and comes from torch's generator, so ``torch.manual_seed`` fixes it."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return x * 0
        with torch.no_grad():  # in place: 1/(1-p) where the uniform draw is >= p, else 0
            scaled_mask = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * scaled_mask


class FusedOps(nn.Module):
    """Base of the modules that have a fused (Triton) variant. `backend` is set when the model is built (or its
    `backend` is set); each call decides from it and the input's device, storing nothing."""

    backend: str = "torch"

    def use_triton(self, x: torch.Tensor) -> bool:
        return self.backend != "torch" and resolve_backend(self.backend, x.device) == "triton"


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------------


class LxmertEmbeddings(nn.Module):
    """Word + learned position + token type embeddings, LayerNorm, dropout (BERT's)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=0)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_length = inputs_embeds.shape[1]
        position_ids = torch.arange(seq_length, device=inputs_embeds.device)
        embeddings = inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class LxmertVisualFeatureEncoder(FusedOps):
    """Object embedding: (LN(W_f f + b_f) + LN(W_p p + b_p)) / 2, then dropout. No position index for objects."""

    def __init__(self, config):
        super().__init__()
        self.visn_fc = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.box_fc = nn.Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, visual_feats, visual_pos):
        if self.use_triton(visual_feats):
            output = _kernels().roi_position_embedding(
                visual_feats,
                visual_pos,
                self.visn_fc.weight,
                self.visn_fc.bias,
                self.visn_layer_norm.weight,
                self.visn_layer_norm.bias,
                self.box_fc.weight,
                self.box_fc.bias,
                self.box_layer_norm.weight,
                self.box_layer_norm.bias,
                eps=self.visn_layer_norm.eps,
            )
        else:
            feats = self.visn_layer_norm(self.visn_fc(visual_feats))
            boxes = self.box_layer_norm(self.box_fc(visual_pos))
            output = (feats + boxes) / 2
        return self.dropout(output)


# ---------------------------------------------------------------------------------------------------------------------
# Attention and the post-norm sublayer outputs
# ---------------------------------------------------------------------------------------------------------------------


class LxmertAttention(nn.Module):
    """Multi-head attention of `hidden_states` (queries) over `context` (keys and values)."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads "
                f"({config.num_attention_heads})"
            )
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(config.attention_probs_dropout_prob)

    def split_heads(self, x):
        # (B, L, C) -> (B, H, L, D)
        return x.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).transpose(1, 2)

    def project(self, hidden_states, context, query_stream: Stream, context_stream: Stream):
        """Queries from `hidden_states`, keys and values from `context`, each (B, H, L, D), unpacked."""
        q = self.split_heads(query_stream.unpack(self.query(hidden_states)))
        k = self.split_heads(context_stream.unpack(self.key(context)))
        v = self.split_heads(context_stream.unpack(self.value(context)))
        return q, k, v

    def attend(self, q, k, v, context_stream: Stream, output_attentions: bool):
        """Returns (context (B, Lq, C), probabilities (B, H, Lq, Lk) or None)."""
        mask = context_stream.additive
        dropout_p = self.dropout.p if self.training else 0.0
        # SDPA fuses the attention, but on the CPU it falls back to a slower unfused path when dropout is on
        if output_attentions or (dropout_p > 0 and q.device.type == "cpu"):
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)  # (B, H, Lq, Lk)
            if mask is not None:
                scores = scores + mask
            probs = self.dropout(scores.softmax(dim=-1))
            context = probs @ v
        else:
            attn_mask = None if mask is None else mask.to(q.dtype)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
            probs = None
        return context.transpose(1, 2).flatten(2), probs  # (B, Lq, C)

    def forward(self, hidden_states, context, query_stream: Stream, context_stream: Stream, output_attentions=False):
        q, k, v = self.project(hidden_states, context, query_stream, context_stream)
        context, probs = self.attend(q, k, v, context_stream, output_attentions)
        return query_stream.pack(context), probs


class LxmertAttentionOutput(FusedOps):
    """LayerNorm(dropout(dense(h)) + residual): the post-norm output of every sublayer."""

    def __init__(self, config, input_size=None):
        super().__init__()
        self.dense = nn.Linear(input_size or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dense(hidden_states)
        if self.use_triton(hidden_states):
            # under autocast the dense output is half precision and the residual may be fp32: the kernel takes
            # one dtype (it accumulates in fp32), so the residual stream continues in the autocast dtype
            return _kernels().add_layernorm(
                hidden_states,
                input_tensor.to(hidden_states.dtype),
                self.LayerNorm.weight,
                self.LayerNorm.bias,
                eps=self.LayerNorm.eps,
                dropout_p=self.dropout.p,
                training=self.training,
            )
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


class LxmertOutput(LxmertAttentionOutput):
    """The FFN's output projection (intermediate -> hidden) with dropout, residual and LayerNorm."""

    def __init__(self, config):
        super().__init__(config, input_size=config.intermediate_size)


class LxmertCrossAttentionLayer(FusedOps):
    """Bidirectional cross-attention: language queries attend to vision and vision queries to language, with ONE
    shared set of weights. Both streams' tokens go through each shared projection (Q, K, V, output) as one GEMM:
    fewer, larger products, and each weight gets one gradient instead of two to accumulate."""

    def __init__(self, config):
        super().__init__()
        self.att = LxmertAttention(config)
        self.output = LxmertAttentionOutput(config)

    def forward(self, lang, lang_stream: Stream, visn, visn_stream: Stream, output_attentions=False):
        """Returns (language output, vision output, language-to-vision probabilities or None)."""
        att = self.att
        both = torch.cat([lang.flatten(0, -2), visn.flatten(0, -2)])  # every token of both streams, (N + B*O, C)
        sizes = (lang.shape[:-1].numel(), visn.shape[:-1].numel())

        def project(linear):
            lang_part, visn_part = linear(both).split(sizes)
            lang_part = lang_stream.unpack(lang_part.view(lang.shape))
            return att.split_heads(lang_part), att.split_heads(visn_part.view(visn.shape))

        (lang_q, visn_q), (lang_k, visn_k), (lang_v, visn_v) = map(project, (att.query, att.key, att.value))
        if not output_attentions and self.use_triton(lang):
            lang_ctx, visn_ctx = _kernels().bidirectional_cross_attention(
                lang_q,
                lang_k,
                lang_v,
                visn_q,
                visn_k,
                visn_v,
                lang_stream.keep,
                visn_stream.keep,
                dropout_p=att.dropout.p if self.training else 0.0,
            )
            lang_ctx, visn_ctx, probs = lang_ctx.transpose(1, 2).flatten(2), visn_ctx.transpose(1, 2).flatten(2), None
        else:
            lang_ctx, probs = att.attend(lang_q, visn_k, visn_v, visn_stream, output_attentions)
            visn_ctx, _ = att.attend(visn_q, lang_k, lang_v, lang_stream, False)
        context = torch.cat([lang_stream.pack(lang_ctx).flatten(0, -2), visn_ctx.flatten(0, -2)])
        lang_out, visn_out = self.output(context, both).split(sizes)
        return lang_out.view(lang.shape), visn_out.view(visn.shape), probs


class LxmertSelfAttentionLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = LxmertAttention(config)
        self.output = LxmertAttentionOutput(config)

    def forward(self, input_tensor, stream: Stream, output_attentions=False):
        context, probs = self.self(input_tensor, input_tensor, stream, stream, output_attentions)
        return self.output(context, input_tensor), probs


class LxmertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        if config.hidden_act != "gelu":
            raise ValueError(f"hidden_act={config.hidden_act!r}: LXMERT uses 'gelu' (erf form) only")

    def forward(self, hidden_states):
        return F.gelu(self.dense(hidden_states))


# ---------------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------------


class LxmertLayer(GradientCheckpointingLayer):
    """A BERT layer (self-attention + FFN, post-norm): the language and object-relationship encoders."""

    def __init__(self, config):
        super().__init__()
        self.attention = LxmertSelfAttentionLayer(config)
        self.intermediate = LxmertIntermediate(config)
        self.output = LxmertOutput(config)

    def forward(self, hidden_states, stream: Stream, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, stream, output_attentions)
        return self.output(self.intermediate(attention_output), attention_output), probs


class LxmertXLayer(GradientCheckpointingLayer):
    """Cross-modality layer: bidirectional cross-attention (one shared module, both directions), then
    self-attention and FFN per stream."""

    def __init__(self, config):
        super().__init__()
        self.visual_attention = LxmertCrossAttentionLayer(config)
        self.lang_self_att = LxmertSelfAttentionLayer(config)
        self.visn_self_att = LxmertSelfAttentionLayer(config)
        self.lang_inter = LxmertIntermediate(config)
        self.lang_output = LxmertOutput(config)
        self.visn_inter = LxmertIntermediate(config)
        self.visn_output = LxmertOutput(config)

    def forward(self, lang, lang_stream: Stream, visn, visn_stream: Stream, output_attentions=False):
        lang, visn, cross_probs = self.visual_attention(lang, lang_stream, visn, visn_stream, output_attentions)
        lang, _ = self.lang_self_att(lang, lang_stream)
        visn, _ = self.visn_self_att(visn, visn_stream)
        lang = self.lang_output(self.lang_inter(lang), lang)
        visn = self.visn_output(self.visn_inter(visn), visn)
        return lang, visn, cross_probs


class LxmertEncoder(nn.Module):
    """Object embedding, then N_L language layers, N_R relationship layers, N_X cross-modality layers.

    The layers are transformers' GradientCheckpointingLayers: with ``model.gradient_checkpointing_enable()`` each
    layer's activations are recomputed in the backward pass instead of kept; the RNG state is restored for the
    recomputation, so dropout masks and gradients are the same."""

    def __init__(self, config):
        super().__init__()
        self.visn_fc = LxmertVisualFeatureEncoder(config)
        self.layer = nn.ModuleList([LxmertLayer(config) for _ in range(config.l_layers)])
        self.x_layers = nn.ModuleList([LxmertXLayer(config) for _ in range(config.x_layers)])
        self.r_layers = nn.ModuleList([LxmertLayer(config) for _ in range(config.r_layers)])

    def forward(self, lang, lang_stream, visual_feats, visual_pos, visn_stream, output_attentions=False):
        """Returns (language_hidden_states, vision_hidden_states, language_attentions, vision_attentions,
        cross_encoder_attentions); the hidden states are each layer's output, as transformers reports them, and
        are packed (N, C) when the language stream is."""
        visn = self.visn_fc(visual_feats, visual_pos)
        lang_states, visn_states, lang_atts, visn_atts, cross_atts = [], [], [], [], []
        for layer in self.layer:
            lang, probs = layer(lang, lang_stream, output_attentions)
            lang_states.append(lang)
            lang_atts.append(probs)
        for layer in self.r_layers:
            visn, probs = layer(visn, visn_stream, output_attentions)
            visn_states.append(visn)
            visn_atts.append(probs)
        for layer in self.x_layers:
            lang, visn, probs = layer(lang, lang_stream, visn, visn_stream, output_attentions)
            lang_states.append(lang)
            visn_states.append(visn)
            cross_atts.append(probs)
        return tuple(lang_states), tuple(visn_states), tuple(lang_atts), tuple(visn_atts), tuple(cross_atts)


class LxmertPooler(nn.Module):
    """Linear + tanh on the language [CLS] output: the cross-modality output."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


class LxmertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)

    def forward(self, hidden_states):
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class LxmertLMPredictionHead(nn.Module):
    """Masked-LM head; its decoder weight is tied to the word embeddings."""

    def __init__(self, config):
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states)) + self.bias


class LxmertPreTrainingHeads(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = LxmertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output, pooled_output):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class GeLU(nn.Module):
    """Module form of the erf GeLU, so `logit_fc` keeps the original Sequential indices (0, 2, 3)."""

    def forward(self, x):
        return F.gelu(x)


def answer_head_mlp(in_dim: int, num_labels: int) -> nn.Sequential:
    """Linear(in, 2*in) -> GeLU -> LayerNorm -> Linear(2*in, labels): LXMERT's QA heads."""
    return nn.Sequential(
        nn.Linear(in_dim, in_dim * 2),
        GeLU(),
        nn.LayerNorm(in_dim * 2, eps=1e-12),
        nn.Linear(in_dim * 2, num_labels),
    )


class LxmertVisualAnswerHead(nn.Module):
    def __init__(self, config, num_labels):
        super().__init__()
        self.logit_fc = answer_head_mlp(config.hidden_size, num_labels)

    def forward(self, hidden_states):
        return self.logit_fc(hidden_states)


def visual_losses(config) -> dict[str, int]:
    """The enabled masked-object losses and their output sizes, in transformers' order."""
    losses = {}
    if config.visual_obj_loss:
        losses["obj"] = config.num_object_labels
    if config.visual_attr_loss:
        losses["attr"] = config.num_attr_labels
    if config.visual_feat_loss:
        losses["feat"] = config.visual_feat_dim
    return losses


class LxmertVisualObjHead(nn.Module):
    """Masked-object heads on the vision output: detector class, attribute, and RoI-feature regression."""

    def __init__(self, config):
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        self.decoder_dict = nn.ModuleDict(
            {key: nn.Linear(config.hidden_size, size) for key, size in visual_losses(config).items()}
        )

    def forward(self, hidden_states):
        hidden_states = self.transform(hidden_states)
        return {key: decoder(hidden_states) for key, decoder in self.decoder_dict.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class LxmertPreTrainedModel(PreTrainedModel):
    """transformers' PreTrainedModel (loading, saving, the hub, resizing, gradient checkpointing, ...) with the
    backend switch and the original release's checkpoints added."""

    config_class = LxmertConfig
    base_model_prefix = "lxmert"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LxmertLayer", "LxmertXLayer"]

    def __init__(self, config, backend: str | None = None):
        check_model_sizes(config)  # a clear message before torch fails on an impossible size
        super().__init__(config)
        self.backend = backend_from_environment() if backend is None else backend

    @property
    def backend(self) -> str:
        """ "auto", "torch" or "triton"; setting it sets it on every fused module and on the encoder."""
        return self._backend

    @backend.setter
    def backend(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        self._backend = backend
        for module in self.modules():
            if isinstance(module, FusedOps):
                module.backend = backend
            elif isinstance(module, LxmertPreTrainedModel):
                module._backend = backend

    def post_init(self):
        super().post_init()
        self.backend = self._backend  # hand the backend to the fused modules built since __init__

    def _init_weights(self, module):
        """transformers' initialisation (normal(0, initializer_range) weights, zero biases and padding rows,
        LayerNorm ones and zeros) and a zero LM-head bias."""
        super()._init_weights(module)
        if isinstance(module, LxmertLMPredictionHead):
            init.zeros_(module.bias)

    def get_qa_logit_layer(self) -> nn.Module | None:
        """The answer head's last linear layer (None without an answer head)."""
        head = getattr(self, "answer_head", None)
        return None if head is None else head.logit_fc[-1]

    @property
    def num_qa_labels(self) -> int:
        return self.config.num_qa_labels

    def resize_num_qa_labels(self, num_labels: int | None):
        """LXMERT's answer-head resizing (transformers'): keep the first rows, start new ones from the initializer,
        set ``config.num_qa_labels``. Returns the new last layer (None without an answer head or a size)."""
        old = self.get_qa_logit_layer()
        if num_labels is None or old is None:
            return None
        if old.out_features != num_labels:
            new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None)
            new = new.to(old.weight.device, old.weight.dtype)
            self._init_weights(new)
            rows = min(old.out_features, num_labels)
            with torch.no_grad():
                new.weight[:rows] = old.weight[:rows]
                if old.bias is not None:
                    new.bias[:rows] = old.bias[:rows]
            self.answer_head.logit_fc[-1] = new
        self.config.num_qa_labels = num_labels
        return self.get_qa_logit_layer()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, missing_heads: str = "init", **kwargs):
        """transformers' ``from_pretrained`` (hub ids, the hub cache, every keyword), plus:

        - a file or a folder without config.json (the original release's ``model_LXRT.pth``, the original code's
          fine-tuned checkpoints, a bare .safetensors/.bin) goes through lxmert_fast's own loader: the original key
          layout is mapped, the config is inferred from the shapes unless ``config=`` is given, and nothing in the
          file is executed (safetensors, or ``torch.load(weights_only=True)``);
        - ``backend=`` (and ``pack_text=`` for LxmertModel) is passed on to the model;
        - ``missing_heads="error"`` raises a CheckpointError naming every weight the checkpoint lacks, has extra or
          has in another shape, instead of transformers' warning and random initialisation (the default, "init").
        """
        from lxmert_fast.model import weights

        if missing_heads not in ("error", "init"):
            raise ValueError(f"missing_heads={missing_heads!r}: expected 'error' or 'init'")
        if pretrained_model_name_or_path is not None:  # a local folder's config.json: broken JSON named with its place
            check_model_folder(Path(pretrained_model_name_or_path) / kwargs.get("subfolder", ""))
        if weights.is_lxmert_fast_checkpoint(pretrained_model_name_or_path, kwargs.get("subfolder", "")):
            return weights.load_pretrained(cls, pretrained_model_name_or_path, missing_heads=missing_heads, **kwargs)
        if missing_heads == "init":
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        weights.raise_on_misfit(model, info, source=str(pretrained_model_name_or_path))
        return (model, info) if wants_info else model


class LxmertModel(LxmertPreTrainedModel):
    """The LXMERT encoder: returns language, vision and pooled (cross-modality) outputs."""

    def __init__(self, config, backend: str | None = None, pack_text: bool = True):
        super().__init__(config, backend)
        self.pack_text = pack_text  # skip the padding of the text stream in token-wise layers (see Stream)
        self.embeddings = LxmertEmbeddings(config)
        self.encoder = LxmertEncoder(config)
        self.pooler = LxmertPooler(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings.word_embeddings = new_embeddings

    def forward(
        self,
        input_ids=None,
        visual_feats=None,
        visual_pos=None,
        attention_mask=None,
        visual_attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        static_shapes: StaticShapes | None = None,
    ):
        """transformers' forward, plus ``static_shapes``: without it the padded text is packed away exactly, with
        shapes that depend on the data (see Stream); with it (torch.compile, CUDA graphs) the text stream is packed
        to ``static_shapes.text_rows`` rows, which the batch must fit (``StaticShapes.fits``, checked by the
        caller on the host). Under torch.jit.trace the text is not packed, so the trace serves batches of any
        padding."""
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict

        text = input_ids if input_ids is not None else inputs_embeds
        _check_inputs(input_ids, inputs_embeds, visual_feats, visual_pos)
        device, input_shape = text.device, (input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1])
        _check_shapes(config, input_shape, visual_feats, visual_pos, attention_mask, visual_attention_mask)

        if attention_mask is None:
            attention_mask = torch.ones(input_shape, device=device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(input_shape, dtype=torch.long, device=device)
        # masks in the parameters' dtype, as transformers builds them (finfo.min, not the original's -10000);
        # padded text is packed away unless attention maps (which cover the padding too) are requested
        pack = (self.pack_text and not output_attentions and not torch.jit.is_tracing()
                and (static_shapes is not None or shapes_may_follow_data()))
        lang_stream = Stream.make(attention_mask, *input_shape, self.dtype, pack=pack, static=static_shapes is not None,
                                  rows=None if static_shapes is None else static_shapes.text_rows)
        visn_stream = Stream.make(visual_attention_mask, *visual_feats.shape[:2], self.dtype)

        lang = lang_stream.pack(self.embeddings(input_ids, token_type_ids, inputs_embeds))
        lang_states, visn_states, lang_atts, visn_atts, cross_atts = self.encoder(
            lang, lang_stream, visual_feats, visual_pos, visn_stream, output_attentions
        )
        lang_output, visual_output = lang_stream.unpack(lang_states[-1]), visn_states[-1]
        if output_hidden_states:
            lang_states = tuple(lang_stream.unpack(state) for state in lang_states)
        pooled_output = self.pooler(lang_output)

        hidden = (lang_states, visn_states) if output_hidden_states else None
        attentions = (lang_atts, visn_atts, cross_atts) if output_attentions else None
        return _model_output((lang_output, visual_output, pooled_output), hidden, attentions, return_dict)


def _model_output(outputs, hidden, attentions, return_dict):
    """LxmertModel's result: the tuple (language, vision, pooled, [hidden states], [attentions]) or the named
    output class, with None for what was not asked for."""
    if not return_dict:
        return outputs + (hidden or ()) + (attentions or ())
    lang_output, visual_output, pooled_output = outputs
    lang_states, visn_states = hidden or (None, None)
    lang_atts, visn_atts, cross_atts = attentions or (None, None, None)
    return LxmertModelOutput(
        pooled_output=pooled_output,
        language_output=lang_output,
        vision_output=visual_output,
        language_hidden_states=lang_states,
        vision_hidden_states=visn_states,
        language_attentions=lang_atts,
        vision_attentions=visn_atts,
        cross_encoder_attentions=cross_atts,
    )


def _check_inputs(input_ids, inputs_embeds, visual_feats, visual_pos):
    """transformers' checks of which inputs were given, with its messages."""
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    if visual_feats is None:
        raise ValueError("`visual_feats` cannot be `None`")
    if visual_pos is None:
        raise ValueError("`visual_pos` cannot be `None`")


def _check_shapes(config, input_shape, visual_feats, visual_pos, attention_mask, visual_attention_mask):
    """Fail early, with the shapes named, instead of deep inside a matmul."""
    batch, num_objects = visual_feats.shape[0], visual_feats.shape[1] if visual_feats.dim() == 3 else None
    if visual_feats.dim() != 3 or visual_feats.shape[-1] != config.visual_feat_dim:
        raise ValueError(
            f"visual_feats must be (batch, objects, {config.visual_feat_dim}), got {tuple(visual_feats.shape)}"
        )
    if tuple(visual_pos.shape) != (batch, num_objects, config.visual_pos_dim):
        raise ValueError(
            f"visual_pos must be {(batch, num_objects, config.visual_pos_dim)} to match visual_feats, "
            f"got {tuple(visual_pos.shape)}"
        )
    if len(input_shape) != 2 or input_shape[0] != batch:
        raise ValueError(f"text batch {tuple(input_shape)} does not match the visual batch size {batch}")
    if input_shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"text length {input_shape[1]} exceeds max_position_embeddings={config.max_position_embeddings}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_shape):
        raise ValueError(f"attention_mask must be {tuple(input_shape)}, got {tuple(attention_mask.shape)}")
    if visual_attention_mask is not None and tuple(visual_attention_mask.shape) != (batch, num_objects):
        raise ValueError(
            f"visual_attention_mask must be {(batch, num_objects)}, got {tuple(visual_attention_mask.shape)}"
        )


class LxmertForPreTraining(LxmertPreTrainedModel):
    """LXMERT with the five pre-training heads: masked LM, masked-object (obj/attr/feat), matching, QA."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "lxmert.embeddings.word_embeddings.weight"}

    def __init__(self, config, backend: str | None = None):
        super().__init__(config, backend)
        self.lxmert = LxmertModel(config, backend)
        self.cls = LxmertPreTrainingHeads(config)
        if config.task_obj_predict:
            self.obj_predict_head = LxmertVisualObjHead(config)
        if config.task_qa:
            self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resizing of the word embeddings and the tied decoder, and the LM bias with them (new
        entries 0)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        bias = self.cls.predictions.bias
        size = embeddings.num_embeddings
        resized = bias.new_zeros(size)
        resized[: min(size, bias.shape[0])] = bias.detach()[:size]
        self.cls.predictions.bias = nn.Parameter(resized)
        return embeddings

    def forward(
        self,
        input_ids=None,
        visual_feats=None,
        visual_pos=None,
        attention_mask=None,
        visual_attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        obj_labels=None,
        matched_label=None,
        ans=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        return_task_losses: bool = False,
        lm_logits_at_labels_only: bool = False,
        static_shapes: StaticShapes | None = None,
        masked_lm_labels=None,
        label_weights: dict | None = None,
    ):
        """transformers' forward, plus these lxmert_fast options:

        - ``return_task_losses``: also give each task's loss as ``out.task_losses`` (mlm, matched, obj, attr, feat, qa),
          an attribute of transformers' output class, not a field (its tuple form is unchanged); with ``return_dict``.
        - ``lm_logits_at_labels_only``: evaluate the LM head only at labelled positions (the same loss, 85% less
          head work); ``prediction_logits`` is then None. Under torch.jit.trace the head runs on every token (a
          trace cannot depend on where the labels are).
        - ``static_shapes``: see LxmertModel.forward; with it the LM head at the labelled positions runs on
          ``static_shapes.lm_label_rows`` rows, the labelled ones first (None: on every token).
        - ``masked_lm_labels``: transformers 4's name of ``labels``; it still means ``labels``, with a FutureWarning.
        - ``label_weights``: {"mlm": (B, T), "qa": (B,)} weights; with one, that loss is the sum of weight x
          cross-entropy over the labelled entries instead of their mean (a loss normalised over more than this batch:
          lxmert_fast.train.objectives.LossGroups).
        """
        label_weights = label_weights or {}
        labels = _labels_from_old_name(labels, masked_lm_labels)
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        encoder_inputs = dict(input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos,
                              attention_mask=attention_mask, visual_attention_mask=visual_attention_mask,
                              token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)
        out = self.lxmert(**encoder_inputs, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states, return_dict=False, static_shapes=static_shapes)
        lang_output, visual_output, pooled_output = out[:3]
        rows = None if static_shapes is None else static_shapes.lm_label_rows  # static shapes: rows of the LM head
        sparse_lm = (lm_logits_at_labels_only and labels is not None and not torch.jit.is_tracing()
                     and (rows is not None if static_shapes is not None else shapes_may_follow_data()))
        scores = self.head_scores(lang_output, pooled_output, lm_head=not sparse_lm)
        losses = {}
        if labels is not None and config.task_mask_lm:
            mlm_weights = label_weights.get("mlm")
            losses["mlm"] = (self.masked_lm_loss_at_labels(lang_output, labels, rows, mlm_weights) if sparse_lm
                             else classification_loss(scores[0], labels, mlm_weights))
        losses.update(self.head_losses(scores[1], scores[2], visual_output, matched_label, ans, obj_labels,
                                       label_weights.get("qa")))
        no_targets = labels is None and matched_label is None and obj_labels is None and ans is None
        total_loss = None if no_targets else sum(losses.values(), torch.zeros((), device=lang_output.device))
        if not return_dict:
            return ((total_loss,) if total_loss is not None else ()) + scores + tuple(out[3:])
        hidden = _hidden_and_attentions(out[3:], output_hidden_states, output_attentions, config)
        output = LxmertForPreTrainingOutput(total_loss, *scores, **hidden)
        if return_task_losses:
            output.task_losses = losses  # an attribute, not a field: see the docstring
        return output

    def head_scores(self, lang_output, pooled_output, lm_head: bool) -> tuple:
        """(LM logits, or None without the LM head; matching logits; answer logits)."""
        return (
            self.cls.predictions(lang_output) if lm_head else None,
            self.cls.seq_relationship(pooled_output),
            # transformers returns this odd scalar when the QA head is disabled; kept for drop-in compatibility
            self.answer_head(pooled_output) if self.config.task_qa else pooled_output[0][0],
        )

    def head_losses(self, matched_score, answer_score, visual_output, matched_label, ans, obj_labels,
                    qa_weights=None) -> dict:
        """The losses of the heads other than the LM head, for the targets given and the tasks the config has."""
        config, losses = self.config, {}
        if matched_label is not None and config.task_matched:
            losses["matched"] = classification_loss(matched_score, matched_label)
        if obj_labels is not None and config.task_obj_predict:
            losses.update(self.masked_object_losses(visual_output, obj_labels))
        if ans is not None and config.task_qa:
            losses["qa"] = classification_loss(answer_score, ans, qa_weights)
        return losses

    def masked_lm_loss_at_labels(self, lang_output, labels, static_rows=None, weights=None):
        """The masked-LM loss with the LM head evaluated at the labelled tokens only (see ``forward``).

        Without ``static_rows`` the labelled rows are found with ``nonzero``. With it they are the first
        ``static_rows`` positions with the labelled tokens first (``true_first``); the rest of those rows are
        unlabelled filler, which the loss ignores, so the loss is the same for a batch that fits."""
        flat_labels = labels.reshape(-1)
        labelled = flat_labels != IGNORE_INDEX
        if static_rows is not None:
            rows = true_first(labelled, min(int(static_rows), flat_labels.numel()))
        else:
            rows = labelled.nonzero().squeeze(1)
        logits = self.cls.predictions(lang_output.reshape(-1, lang_output.shape[-1]).index_select(0, rows))
        if weights is not None:
            weights = weights.reshape(-1).index_select(0, rows)
        return classification_loss(logits, flat_labels.index_select(0, rows), weights)

    def masked_object_losses(self, visual_output, obj_labels) -> dict[str, torch.Tensor]:
        """Detector-label CE (weighted by the detector's confidence, over ALL objects — the original's intent) and
        Smooth-L1 feature regression on masked objects, each a mean over B*V objects times visual_loss_normalizer."""
        scores = self.obj_predict_head(visual_output)
        losses = {}
        for key, size in visual_losses(self.config).items():
            label, weight = obj_labels[key]
            prediction = scores[key].reshape(-1, size).float()
            if key == "feat":
                loss = F.smooth_l1_loss(prediction, label.reshape(-1, size).float(), reduction="none").mean(1)
            else:
                loss = F.cross_entropy(prediction, label.reshape(-1), reduction="none")
            losses[key] = (loss * weight.reshape(-1).float()).mean() * self.config.visual_loss_normalizer
        return losses


def _labels_from_old_name(labels, masked_lm_labels):
    """``labels``, or transformers 4's old name for them, ``masked_lm_labels``, with a FutureWarning (transformers 5
    ignores it silently, dropping the masked-LM loss)."""
    if masked_lm_labels is None:
        return labels
    if labels is not None:
        raise ValueError("pass the masked-LM targets as labels= only (masked_lm_labels is its old name)")
    warnings.warn("masked_lm_labels is deprecated: pass labels= instead", FutureWarning, stacklevel=3)
    return masked_lm_labels


def classification_loss(logits, labels, weights=None):
    """Mean cross-entropy over the labelled rows (label != -100), taken in fp32; with ``weights`` (one per row),
    the sum of weight x cross-entropy over them.

    Written as sum / count so a batch with no labelled row (a small batch without masked words, or QA switched off
    for an epoch) gives 0, still in the graph, where transformers' mean gives NaN; otherwise the same value.
    """
    labels = labels.reshape(-1)
    if weights is not None:
        each = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, reduction="none")  # 0 unlabelled
        return (each * weights.reshape(-1).float()).sum()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _hidden_and_attentions(extra, output_hidden_states, output_attentions, config) -> dict:
    """Map LxmertModel's tuple tail back to the named output fields."""
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    extra = list(extra)
    fields = {}
    if output_hidden_states:
        fields["language_hidden_states"], fields["vision_hidden_states"] = extra[:2]
        extra = extra[2:]
    if output_attentions:
        fields["language_attentions"], fields["vision_attentions"], fields["cross_encoder_attentions"] = extra[:3]
    return fields


class LxmertForQuestionAnswering(LxmertPreTrainedModel):
    """LXMERT with an answer classifier on the pooled output (VQA, GQA)."""

    def __init__(self, config, backend: str | None = None):
        super().__init__(config, backend)
        self.lxmert = LxmertModel(config, backend)
        self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        visual_feats=None,
        visual_pos=None,
        attention_mask=None,
        visual_attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        static_shapes: StaticShapes | None = None,
    ):
        """`labels`: (B,) answer indices, cross-entropy as transformers (the VQA recipe's soft-score BCE lives in
        lxmert_fast.finetune)."""
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        out = self.lxmert(
            input_ids=input_ids,
            visual_feats=visual_feats,
            visual_pos=visual_pos,
            attention_mask=attention_mask,
            visual_attention_mask=visual_attention_mask,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=False,
            static_shapes=static_shapes,
        )
        answer_score = self.answer_head(out[2])
        loss = None
        if labels is not None:
            loss = classification_loss(answer_score, labels)
        if not return_dict:
            output = (answer_score,) + tuple(out[3:])
            return ((loss,) + output) if loss is not None else output
        hidden = _hidden_and_attentions(out[3:], output_hidden_states, output_attentions, config)
        return LxmertForQuestionAnsweringOutput(loss=loss, question_answering_score=answer_score, **hidden)


@dataclass
class LxmertForNLVR2Output(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, 2)
    pooled_output: torch.Tensor | None = None  # (B, 2, C): the pooled vector of (img0, sent) and (img1, sent)


class LxmertForNLVR2(LxmertPreTrainedModel):
    """NLVR2 (the original's pair head; transformers has none): the sentence is encoded with each of the two images
    in separate passes, the two pooled vectors are concatenated and classified true/false."""

    def __init__(self, config, backend: str | None = None):
        super().__init__(config, backend)
        self.lxmert = LxmertModel(config, backend)
        pair = 2 * config.hidden_size  # the original's NLVR2 head keeps this width (its QA head doubles it)
        self.logit_fc = nn.Sequential(nn.Linear(pair, pair), GeLU(), nn.LayerNorm(pair, eps=1e-12), nn.Linear(pair, 2))
        self.post_init()

    def forward(
        self,
        input_ids=None,
        visual_feats=None,
        visual_pos=None,
        attention_mask=None,
        visual_attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        return_dict=None,
        static_shapes: StaticShapes | None = None,
    ):
        """Text (B, L); visual_feats (B, 2, V, F), visual_pos (B, 2, V, 4), visual_attention_mask (B, 2, V);
        labels (B,) in {0, 1}; ``static_shapes`` as LxmertModel's, for the (B, L) text given."""
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        if visual_feats is None or visual_feats.dim() != 4 or visual_feats.shape[1] != 2:
            shape = None if visual_feats is None else tuple(visual_feats.shape)
            raise ValueError(f"visual_feats must be (batch, 2, objects, features) for NLVR2, got {shape}")

        def twice(x):
            # (B, ...) -> (2B, ...): each sentence once per image, [s0, s0, s1, s1, ...] as the original
            return None if x is None else x.repeat_interleave(2, dim=0)

        def pairs(x):
            # (B, 2, ...) -> (2B, ...): [img0_0, img0_1, img1_0, img1_1, ...]
            return None if x is None else x.flatten(0, 1)

        out = self.lxmert(
            input_ids=twice(input_ids),
            visual_feats=pairs(visual_feats),
            visual_pos=pairs(visual_pos),
            attention_mask=twice(attention_mask),
            visual_attention_mask=pairs(visual_attention_mask),
            token_type_ids=twice(token_type_ids),
            inputs_embeds=twice(inputs_embeds),
            return_dict=False,
            static_shapes=None if static_shapes is None else static_shapes.repeated(2),
        )
        pooled = out[2].view(-1, 2, config.hidden_size)  # (B, 2, C)
        logits = self.logit_fc(pooled.flatten(1))  # (B, 2)
        loss = classification_loss(logits, labels) if labels is not None else None
        if not return_dict:
            return (loss, logits, pooled) if loss is not None else (logits, pooled)
        return LxmertForNLVR2Output(loss=loss, logits=logits, pooled_output=pooled)
