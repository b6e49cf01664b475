"""Attention maps of a trained LXMERT (as in the paper's analysis): what each encoder attends to for one sentence
and one image.

    python -m lxmert_fast.visualize --model DIR --features x.tsv --img-id ID --sentence "what color is the dog?" \
        [--out-dir attention/] [--head N] [--image img.jpg] [--objects-vocab objects_vocab.txt] [--tokenizer DIR]

Writes one PNG per attention kind, a panel per layer (heads averaged, or head N), the real tokens only:
    language_self_attention.png              words x words, the language encoder's layers
    object_relationship_attention.png        objects x objects, the object-relationship encoder's layers
    cross_attention_language_to_vision.png   words x objects, each cross-modality layer
    cross_attention_vision_to_language.png   objects x words, each cross-modality layer
    boxes.png (with --image)                 the image with its boxes, each drawn with the attention weight the
                                             [CLS] token gives it in the last cross-modality layer

The maps are computed and drawn by lxmert_fast.use.attention (the Python API); the flags are checked before torch
and transformers load.

Objects are labelled "index:name" with the names of the detector's vocabulary (one class per line, the original's
objects_vocab.txt; of "name,synonym" lines the first name): --objects-vocab, or an objects_vocab.txt beside the
features (the sample data has one); without either, "index:class id". Needs matplotlib
(`pip install -e ".[plot]"`); --image also needs Pillow, and the image the features were extracted from (another
shape is refused; a scaled copy is fitted).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lxmert_fast.cli import run
from lxmert_fast.errors import InputError
from lxmert_fast.model.folder import has_tokenizer


def load_encoder(model_path):
    """The LXMERT encoder of a model folder (pre-trained or fine-tuned: through the class its config.json names, so
    that its head weights are not reported as unexpected), a transformers folder or model_LXRT.pth."""
    import lxmert_fast
    from lxmert_fast.files import read_json
    from lxmert_fast.model.modeling import LxmertModel

    config = Path(model_path) / "config.json"
    names = read_json(config, "a model config").get("architectures") or [] if config.is_file() else []
    model_class = getattr(lxmert_fast, names[0]) if names and names[0] in lxmert_fast.__all__ else LxmertModel
    model = model_class.from_pretrained(model_path, backend="torch").eval()
    return model if isinstance(model, LxmertModel) else model.lxmert


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m lxmert_fast.visualize",
        description="Draw LXMERT's attention maps (language, object-relationship, cross-modality) for one sentence "
        "and one image.",
    )
    parser.add_argument("--model", required=True, help="a model folder (ours or transformers') or model_LXRT.pth")
    parser.add_argument("--features", required=True, help="object-feature TSV (or a converted store) with the image")
    parser.add_argument("--img-id", required=True, help="the image's img_id in the features")
    parser.add_argument("--sentence", required=True, help="the sentence or question")
    parser.add_argument("--out-dir", default="attention", help="where the PNGs go (default: attention)")
    parser.add_argument("--head", type=int, default=None, help="draw this head only (default: heads averaged)")
    parser.add_argument("--image", help="the image file: also draw its boxes with the [CLS] token's attention")
    parser.add_argument("--objects-vocab", help="detector classes, one per line (objects_vocab.txt): box names")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer folder or hub name (default: the model folder's, if it has one, else bert-base-uncased)",
    )
    args = parser.parse_args(argv)
    from lxmert_fast.use.attention import (
        attention_maps,
        check_image_size,
        draw,
        load_image_features,
        object_labels,
        objects_vocab_beside,
        pyplot,
        read_objects_vocab,
    )

    pyplot()  # fail early, before loading the model, when matplotlib is missing

    from lxmert_fast.data.tokenizer import load_tokenizer

    model = load_encoder(args.model)
    tokenizer = load_tokenizer(args.tokenizer or (args.model if has_tokenizer(args.model) else "bert-base-uncased"))
    try:
        feats, boxes, class_ids, image_hw = load_image_features(args.features, args.img_id)
    except KeyError as e:
        raise InputError(f"--img-id {args.img_id}: {e.args[0]}") from None
    if feats.shape[-1] != model.config.visual_feat_dim:
        raise InputError(
            f"--features {args.features}: {feats.shape[-1]}-d features, the model expects "
            f"{model.config.visual_feat_dim}"
        )
    vocab_file = args.objects_vocab or objects_vocab_beside(args.features)
    vocab = read_objects_vocab(vocab_file) if vocab_file else None
    try:
        maps = attention_maps(model, tokenizer, args.sentence, feats, boxes, args.head)
    except ValueError as e:
        raise InputError(str(e)) from None
    labels = object_labels(class_ids, vocab)
    if args.image:
        check_image_size(args.image, image_hw)
    paths = draw(maps, labels, args.out_dir, args.sentence, args.head, args.image, boxes[0].numpy())
    for p in paths:
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    run(main)
