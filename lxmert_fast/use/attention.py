"""Attention maps of a trained LXMERT (as in the paper's analysis): what each encoder attends to for one sentence
and one image, computed (`attention_maps`) and drawn (`draw`: one PNG per kind of attention, a panel per layer).

The model returns the cross-attention of the language queries only (`cross_encoder_attentions`, as transformers'
LXMERT). The other direction uses the same shared module, so it is recomputed here from the layer's inputs (the
hidden states the model also returns) and that module's query and key weights: the same formula the model runs,
in eval mode, without dropout. Drawing needs matplotlib (and Pillow for the boxes on the image). The command is
lxmert_fast/visualize.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lxmert_fast.errors import ImageError, MissingDependencyError


def read_objects_vocab(path) -> list[str]:
    """Class names by id from a detector vocabulary file: one class per line, the first of comma-separated names."""
    return [names[0] for names in read_object_synonyms(path)]


def read_object_synonyms(path) -> list[list[str]]:
    """Every name of each class by id, from a detector vocabulary file of "name,synonym" lines (Visual Genome's)."""
    with open(path, encoding="utf-8") as f:
        return [[name.strip() for name in line.strip().split(",")] for line in f]


def objects_vocab_beside(features) -> Path | None:
    """The objects_vocab.txt in the folder of the (first) feature file, where the sample data writes it, or None."""
    first = Path(str(features).split(",")[0])
    candidate = (first if first.is_dir() else first.parent) / "objects_vocab.txt"
    return candidate if candidate.is_file() else None


def check_image_size(image_path, image_hw, tolerance: float = 0.02) -> None:
    """Refuse an image whose shape is not the one the features were extracted from (its boxes would land in the
    wrong places); a scaled copy of it is fitted (the boxes are drawn in fractions of the image)."""
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("--image needs Pillow: pip install pillow") from None
    with Image.open(image_path) as image:
        width, height = image.size
    img_h, img_w = image_hw
    if abs((width / height) / (img_w / img_h) - 1) > tolerance:
        raise ImageError(f"{image_path}: {width}x{height} pixels, but the features were extracted from an image of "
                         f"{img_w}x{img_h} (width x height): another image, or a crop; give the image the features "
                         "were extracted from")


def object_labels(class_ids, vocab: list[str] | None = None) -> list[str]:
    labels = []
    for i, c in enumerate(int(c) for c in class_ids):
        labels.append(f"{i}:{vocab[c] if vocab is not None and 0 <= c < len(vocab) else c}")
    return labels


def load_image_features(features, img_id: str):
    """(visual_feats (1, V, F) float32, visual_pos (1, V, 4), class ids (V,), (img_h, img_w)) of the real boxes."""
    from lxmert_fast.data.pretrain_dataset import as_feature_store

    store = as_feature_store(features)
    row = store.row(img_id)
    nb = int(store.num_boxes[row])
    feats = torch.from_numpy(np.asarray(store.features[row][:nb], dtype=np.float32))[None]
    boxes = torch.from_numpy(np.array(store.boxes[row][:nb], dtype=np.float32))[None]
    img_h, img_w = (int(v) for v in store.img_hw[row])
    return feats, boxes, np.array(store.obj_ids[row][:nb]), (img_h, img_w)


def _additive(mask, dtype):
    """(B, K) 1 = real, 0 = padding -> (B, 1, 1, K) additive mask, as the model builds it."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def cross_attentions_from_states(model, outputs, attention_mask, visual_attention_mask=None):
    """(language-to-vision, vision-to-language): per cross-modality layer (B, H, L, V) and (B, H, V, L), recomputed
    from each layer's inputs (the previous layer's hidden states) with its shared cross-attention module's query and
    key weights. The model returns only the first; a test checks that this recomputes it exactly."""
    config = model.config
    if config.l_layers == 0 or config.r_layers == 0:
        raise ValueError(
            "recomputing the cross-attention needs at least one language and one object-relationship layer "
            "(their outputs are the first cross layer's inputs)"
        )
    lang_states, visn_states = outputs.language_hidden_states, outputs.vision_hidden_states
    dtype = lang_states[0].dtype
    lang_mask = _additive(attention_mask, dtype)
    visn_mask = 0.0 if visual_attention_mask is None else _additive(visual_attention_mask, dtype)
    to_vision, to_language = [], []
    for i, layer in enumerate(model.encoder.x_layers):
        att = layer.visual_attention.att
        lang, visn = lang_states[config.l_layers + i - 1], visn_states[config.r_layers + i - 1]
        lang_q, lang_k = att.split_heads(att.query(lang)), att.split_heads(att.key(lang))  # (B, H, L, D)
        visn_q, visn_k = att.split_heads(att.query(visn)), att.split_heads(att.key(visn))  # (B, H, V, D)
        scale = math.sqrt(att.attention_head_size)
        to_vision.append((lang_q @ visn_k.transpose(-1, -2) / scale + visn_mask).softmax(-1))  # (B, H, L, V)
        to_language.append((visn_q @ lang_k.transpose(-1, -2) / scale + lang_mask).softmax(-1))  # (B, H, V, L)
    return tuple(to_vision), tuple(to_language)


@torch.no_grad()
def attention_maps(model, tokenizer, sentence: str, visual_feats, visual_pos, head: int | None = None) -> dict:
    """The four kinds of attention for one sentence and one image, each a list over layers of (queries, keys)
    numpy arrays (heads averaged, or head `head`), plus "tokens" (the word pieces, [CLS] and [SEP] included)."""
    enc = tokenizer(sentence.strip(), return_tensors="pt")
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    heads = model.config.num_attention_heads
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"--head {head}: the model has heads 0..{heads - 1}")
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        visual_feats=visual_feats,
        visual_pos=visual_pos,
        output_attentions=True,
        output_hidden_states=True,
        return_dict=True,
    )

    def reduce(maps):
        return [(m[0].mean(0) if head is None else m[0, head]).float().numpy() for m in maps]

    return {
        "tokens": tokenizer.convert_ids_to_tokens(input_ids[0].tolist()),
        "language": reduce(outputs.language_attentions),
        "vision": reduce(outputs.vision_attentions),
        "language_to_vision": reduce(outputs.cross_encoder_attentions),
        "vision_to_language": reduce(cross_attentions_from_states(model, outputs, attention_mask)[1]),
    }


# ------------------------------------------------------------------------------------------------------ plots
def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            'lxmert_fast.visualize needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)'
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(maps, row_labels, col_labels, title: str, layer_name: str, path, axes_names=("queries", "keys")
                ) -> Path:
    """One heat map per layer (rows: the queries, who attends; columns: the keys, whom they attend to), side by
    side on ONE colour scale (panels on their own scales make a near-uniform map look structured), to `path`."""
    plt = pyplot()
    n = len(maps)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    cell = 0.22
    width = max(3.5, cell * len(col_labels) + 1.8)
    height = max(3.0, cell * len(row_labels) + 1.8)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.0, height * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    high = max(float(m.max()) for m in maps)  # from 0: a weight is a share, and 1/36 everywhere should look flat
    for i, (ax, m) in enumerate(zip(axes.flat, maps, strict=False)):
        image = ax.imshow(m, cmap="viridis", aspect="auto", vmin=0.0, vmax=high)
        ax.set_title(f"{layer_name} {i}", fontsize=9)
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=6)
        ax.set_xlabel(f"attended to ({axes_names[1]})", fontsize=7)
        ax.set_ylabel(f"attending ({axes_names[0]})", fontsize=7)
    fig.colorbar(image, ax=list(axes.flat[:n]), fraction=0.046, pad=0.02, label="attention weight")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_boxes(image_path, boxes, weights, labels, title: str, path, labelled: int = 5) -> Path:
    """The image with each box outlined, colour and line width from its attention weight (from the smallest weight,
    thin and pale, to the largest), the `labelled` strongest boxes labelled "index:class weight", and a colour bar
    of the weights. `boxes`: (V, 4) normalised x1, y1, x2, y2."""
    plt = pyplot()
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("--image needs Pillow: pip install pillow") from None
    image = np.asarray(Image.open(image_path).convert("RGB"))
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.5))
    ax.imshow(image)
    low, high = float(np.min(weights)), float(np.max(weights))
    norm = plt.Normalize(low, high if high > low else low + 1e-6)
    cmap = plt.get_cmap("plasma")
    order = np.argsort(weights)  # the strongest drawn last, on top
    for k in order:
        x1, y1, x2, y2 = (float(v) for v in boxes[k] * np.array([w, h, w, h]))
        strength = float(norm(weights[k]))
        ax.add_patch(
            plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=cmap(strength), lw=0.5 + 3.5 * strength)
        )
    for k in order[::-1][:labelled]:
        x1, y1 = float(boxes[k][0] * w), float(boxes[k][1] * h)
        ax.text(x1, y1, f"{labels[k]} {weights[k]:.3f}", fontsize=7, color="black", va="bottom",
                bbox={"facecolor": cmap(float(norm(weights[k]))), "alpha": 0.9, "pad": 1, "lw": 0})  # fmt: skip
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.02, label="attention")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def draw(maps, labels, out_dir, sentence: str, head: int | None, image=None, boxes=None) -> list[Path]:
    """Write the PNGs of `attention_maps`' result; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = maps["tokens"]
    which = "heads averaged" if head is None else f"head {head}"
    about = f'"{sentence}" ({which})'
    written = [
        plot_layers(
            maps["language"],
            words,
            words,
            f"Language self-attention: {about}",
            "language layer",
            out_dir / "language_self_attention.png",
            ("words", "words"),
        ),
        plot_layers(
            maps["vision"],
            labels,
            labels,
            f"Object-relationship attention: {about}",
            "relationship layer",
            out_dir / "object_relationship_attention.png",
            ("objects", "objects"),
        ),
        plot_layers(
            maps["language_to_vision"],
            words,
            labels,
            f"Cross-attention, words -> objects: {about}",
            "cross layer",
            out_dir / "cross_attention_language_to_vision.png",
            ("words", "objects"),
        ),
        plot_layers(
            maps["vision_to_language"],
            labels,
            words,
            f"Cross-attention, objects -> words: {about}",
            "cross layer",
            out_dir / "cross_attention_vision_to_language.png",
            ("objects", "words"),
        ),
    ]
    if image is not None:
        weights = maps["language_to_vision"][-1][0]  # the [CLS] row of the last cross layer
        title = f"[CLS] -> objects, last cross-modality layer ({which}): {sentence}"
        written.append(plot_boxes(image, boxes, weights, labels, title, out_dir / "boxes.png"))
    return written
