"""A small, learnable sample data set in exactly the released LXMERT formats, plus a WordPiece vocabulary for it.

Each synthetic image holds 1-3 kinds of foreground objects (half the images one kind; a name, a colour, a count of
1-4 instances) on 1-2 kinds of background ("grass", "sky", ...). Its 36 boxes are the instances, then jittered
duplicates of them and background regions (as a detector's overlapping proposals). A box's feature is a fixed random
prototype of its object class plus one of its colour plus noise (ReLU'ed like the real RoI features), so object /
attribute classification and masked-feature regression can be learnt. Captions and questions mention the objects' names,
colours and counts ("how many dogs are there?" -> "2", sometimes written "two"), so masked words, matching and
QA are learnable too. Some answers need normalisation ("grey", "the dog", "two") and a few are unknown to the
answer table, as in the real data.

Public API
    OBJECT_NAMES, ATTRIBUTE_NAMES     label names: object id k is OBJECT_NAMES[k], attribute id k ATTRIBUTE_NAMES[k]
    SamplePaths                       dataclass: root, train_json, valid_json, features_tsv, answer_table,
                                      tokenizer_dir
    make_sample_data(out_dir, num_images=300, seed=0, feat_dim=2048) -> SamplePaths   (writes unconditionally)
    ensure_sample_data(root, num_images=300, seed=0, feat_dim=2048) -> SamplePaths
        generate into `root` unless a complete sample with the same parameters is there; atomic and safe
        when several processes call it at once
    build_wordpiece_vocab(texts, out_dir, vocab_size=1000) -> Path
        build a lower-casing WordPiece vocabulary (the same ids in every process, whatever PYTHONHASHSEED) and
        save it as a folder BertTokenizerFast.from_pretrained loads ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .formats import ImageFeatures, write_feature_tsv
from .fsutil import build_lock, publish_dir, remove_stale_staging, staging_dir

# (singular, plural); the first 20 are foreground objects, the rest background regions.
OBJECTS = [
    ("dog", "dogs"),
    ("cat", "cats"),
    ("car", "cars"),
    ("tree", "trees"),
    ("person", "people"),
    ("ball", "balls"),
    ("cup", "cups"),
    ("chair", "chairs"),
    ("table", "tables"),
    ("bird", "birds"),
    ("horse", "horses"),
    ("boat", "boats"),
    ("bus", "buses"),
    ("kite", "kites"),
    ("bench", "benches"),
    ("bottle", "bottles"),
    ("clock", "clocks"),
    ("lamp", "lamps"),
    ("book", "books"),
    ("plate", "plates"),
    ("grass", "grass"),
    ("sky", "sky"),
    ("wall", "walls"),
    ("road", "roads"),
    ("water", "water"),
]
NUM_FOREGROUND = 20
OBJECT_NAMES = tuple(s for s, _ in OBJECTS)
ATTRIBUTE_NAMES = ("red", "blue", "green", "yellow", "white", "black", "brown", "gray", "orange", "pink")
_BACKGROUND_COLOURS = {
    "grass": ("green", "brown"),
    "sky": ("blue", "gray", "white"),
    "wall": ("white", "gray", "yellow"),
    "road": ("gray", "black"),
    "water": ("blue", "green"),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_QA_DSETS = ("vqa", "gqa", "visual7w")
_VERSION = 4  # 2: objects_vocab.txt beside the features; 3: the vocabulary's ids no longer depend on the process;
# 4: half the images show one kind of object, a region description per kind, plurals in objects_vocab.txt
OBJECTS_VOCAB = "objects_vocab.txt"  # the detector's class names, one per line, as the original's file


@dataclass(frozen=True)
class SamplePaths:
    root: Path
    train_json: Path
    valid_json: Path
    features_tsv: Path
    answer_table: Path
    tokenizer_dir: Path

    @classmethod
    def under(cls, root) -> SamplePaths:
        root = Path(root)
        return cls(
            root=root,
            train_json=root / "lxmert" / "sample_train.json",
            valid_json=root / "lxmert" / "sample_valid.json",
            features_tsv=root / "sample_imgfeat" / "sample_obj36.tsv",
            answer_table=root / "lxmert" / "all_ans.json",
            tokenizer_dir=root / "tokenizer",
        )


def _phrase(count: int, colour: str, name: int) -> str:
    singular, plural = OBJECTS[name]
    if count == 1:
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {singular}"
    return f"{_NUMBER_WORDS[count]} {colour} {plural}"


class _Scene(NamedTuple):
    """What one image shows: foreground kinds with their colour and count, and background regions."""

    kinds: np.ndarray  # foreground object ids
    colours: np.ndarray  # one attribute id per kind
    counts: np.ndarray  # 1-4 instances per kind
    backgrounds: np.ndarray  # background object ids
    bg_colours: list[int]  # one attribute id per background


def _scene(rng: np.random.Generator) -> _Scene:
    # half the images show one kind: what a word names is then unambiguous, which lets a small model bind words to
    # objects (matching, masked object words, presence questions) within minutes
    kinds = rng.choice(NUM_FOREGROUND, size=int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])), replace=False)
    colours = rng.choice(len(ATTRIBUTE_NAMES), size=len(kinds), replace=False)
    counts = rng.integers(1, 5, size=len(kinds))
    backgrounds = rng.choice(np.arange(NUM_FOREGROUND, len(OBJECTS)), size=int(rng.integers(1, 3)), replace=False)
    bg_colours = [ATTRIBUTE_NAMES.index(str(rng.choice(_BACKGROUND_COLOURS[OBJECT_NAMES[b]]))) for b in backgrounds]
    return _Scene(kinds, colours, counts, backgrounds, bg_colours)


def _box_proposals(rng: np.random.Generator, scene: _Scene, img_w: int, img_h: int, num_boxes: int):
    """(labels, boxes): every instance once, then duplicates of instances and background regions up to num_boxes,
    as a detector's overlapping proposals. labels are (object id, attribute id), boxes [x1, y1, x2, y2]."""
    labels = [(int(o), int(c)) for o, c, n in zip(scene.kinds, scene.colours, scene.counts, strict=True)
              for _ in range(n)]
    boxes = []
    for _ in labels:
        w, h = rng.uniform(0.1, 0.4) * img_w, rng.uniform(0.1, 0.4) * img_h
        x1, y1 = rng.uniform(0, img_w - w), rng.uniform(0, img_h - h)
        boxes.append([x1, y1, x1 + w, y1 + h])
    num_instances = len(labels)
    while len(labels) < num_boxes:
        if rng.random() < 0.5:
            j = int(rng.integers(num_instances))
            labels.append(labels[j])
            x1, y1, x2, y2 = boxes[j]
            jitter = rng.normal(0, 0.05, size=4) * [x2 - x1, y2 - y1, x2 - x1, y2 - y1]
            boxes.append(list(np.clip(np.add(boxes[j], jitter), 0, [img_w, img_h, img_w, img_h])))
        else:
            j = int(rng.integers(len(scene.backgrounds)))
            labels.append((int(scene.backgrounds[j]), scene.bg_colours[j]))
            y1 = rng.uniform(0, 0.6) * img_h
            boxes.append([0.0, y1, float(img_w), min(img_h, y1 + rng.uniform(0.2, 0.6) * img_h)])
    return labels, boxes


def _image_features(rng: np.random.Generator, img_id: str, img_h: int, img_w: int, labels, boxes, obj_proto,
                    attr_proto) -> ImageFeatures:
    """The boxes in random order with their labels, confidences and features (the prototypes of the box's class and
    colour plus noise, ReLU'ed like real RoI features)."""
    num_boxes, feat_dim = len(labels), obj_proto.shape[1]
    order = rng.permutation(num_boxes)
    obj = np.array([labels[i][0] for i in order], dtype=np.int64)
    attr = np.array([labels[i][1] for i in order], dtype=np.int64)
    box_arr = np.array([boxes[i] for i in order], dtype=np.float32)
    box_arr = np.minimum(box_arr, np.array([img_w, img_h, img_w, img_h], dtype=np.float32))
    feats = obj_proto[obj] + attr_proto[attr] + rng.normal(0, 0.3, size=(num_boxes, feat_dim))
    return ImageFeatures(
        img_id=img_id,
        img_h=img_h,
        img_w=img_w,
        objects_id=obj,
        objects_conf=rng.uniform(0.5, 1.0, size=num_boxes).astype(np.float32),
        attrs_id=attr,
        attrs_conf=rng.uniform(0.2, 0.9, size=num_boxes).astype(np.float32),
        boxes=box_arr,
        features=np.maximum(feats, 0).astype(np.float32),
    )


def _captions(rng: np.random.Generator, fg, scene: _Scene) -> tuple[list[str], list[str]]:
    """(mscoco, vg) captions: two naming the foreground objects and the first background, and one region
    description per foreground kind (as Visual Genome's, several an image)."""
    things = [_phrase(n, c, o) for o, c, n in fg]
    listing = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    bg_name = OBJECT_NAMES[int(scene.backgrounds[0])]
    prefix = str(rng.choice(["a photo of", "there are", "an image with", "we can see"]))
    mscoco = [f"{prefix} {listing}.", f"{listing} near the {ATTRIBUTE_NAMES[scene.bg_colours[0]]} {bg_name}"]
    return mscoco, [f"{thing} on the {bg_name}" for thing in things]


def _count_question(rng: np.random.Generator, o: int, n: int):
    answer = {str(n): 1.0} if rng.random() < 0.7 else {_NUMBER_WORDS[n]: 1.0}
    if rng.random() < 0.3:
        answer[str(min(n + 1, 4) if n < 4 else 3)] = 0.3
    return f"how many {OBJECTS[o][1]} are there?", answer


def _colour_question(rng: np.random.Generator, o: int, c: str):
    answer = {("grey" if c == "gray" and rng.random() < 0.5 else c): 1.0}
    if rng.random() < 0.1:
        answer["dunno"] = 0.3  # not in the answer table: dropped at load time
    return f"what color is the {OBJECTS[o][0]}?", answer


def _presence_question(rng: np.random.Generator, fg):
    if rng.random() < 0.5:
        o = fg[int(rng.integers(len(fg)))][0]
        return f"is there a {OBJECT_NAMES[o]} in the picture?", {"yes": 1.0}
    absent = [k for k in range(NUM_FOREGROUND) if k not in {f[0] for f in fg}]
    return f"is there a {OBJECT_NAMES[int(rng.choice(absent))]} in the picture?", {"no": 1.0}


def _which_question(rng: np.random.Generator, o: int, c: str):
    article = str(rng.choice(["", "a ", "the "]))
    return f"what is the {c} object?", {f"{article}{OBJECT_NAMES[o]}": 1.0}


def _questions(rng: np.random.Generator, fg):
    """(vqa, gqa): lists of (question, soft answer) about randomly picked foreground objects."""
    o1, c1, n1 = fg[int(rng.integers(len(fg)))]
    o2, c2, _ = fg[int(rng.integers(len(fg)))]
    vqa = [_count_question(rng, o1, n1), _colour_question(rng, o2, c2), _presence_question(rng, fg)]
    o3, c3, _ = fg[int(rng.integers(len(fg)))]
    return vqa, [_which_question(rng, o3, c3)]


def _image(rng: np.random.Generator, k: int, obj_proto, attr_proto, num_boxes: int):
    """One synthetic image: (ImageFeatures, its annotation record)."""
    img_id = f"sample_{k:06d}"
    img_h, img_w = (int(v) for v in rng.integers(240, 641, size=2))
    scene = _scene(rng)
    labels, boxes = _box_proposals(rng, scene, img_w, img_h, num_boxes)
    record = _image_features(rng, img_id, img_h, img_w, labels, boxes, obj_proto, attr_proto)

    # Language: captions (no labelf) and questions with soft answers.
    fg = [(int(o), ATTRIBUTE_NAMES[c], int(n))  # (object id, colour name, count) per foreground kind
          for o, c, n in zip(scene.kinds, scene.colours, scene.counts, strict=True)]
    mscoco, vg = _captions(rng, fg, scene)
    vqa, gqa = _questions(rng, fg)
    annotation = {
        "img_id": img_id,
        "sentf": {"mscoco": mscoco, "vg": vg, "vqa": [q for q, _ in vqa], "gqa": [q for q, _ in gqa]},
        "labelf": {"vqa": [a for _, a in vqa], "gqa": [a for _, a in gqa]},
    }
    return record, annotation


def _answer_table() -> list[dict]:
    answers = [str(i) for i in range(11)] + ["yes", "no"] + list(ATTRIBUTE_NAMES) + list(OBJECT_NAMES)
    return [{"ans": a, "dsets": list(_QA_DSETS[: 1 + i % 3])} for i, a in enumerate(answers)]


def build_wordpiece_vocab(texts: Iterable[str], out_dir, vocab_size: int = 1000) -> Path:
    """Build a lower-casing BERT WordPiece vocabulary for `texts` and save it to `out_dir` as a folder that
    transformers.BertTokenizerFast.from_pretrained loads. Special tokens: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
    [MASK]=4, then every character (alone and as a "##" continuation), then whole words, most frequent first.
    The ids are a function of `texts` alone: tokenizers' WordPiece trainer breaks ties between equally frequent
    pairs in an order that changes from process to process, so two nodes would train on different token ids.
    The vocabulary may come out smaller than `vocab_size` on a small corpus."""
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizerFast

    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = Counter(w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters + [f"##{c}" for c in characters]
    known = set(vocab)
    vocab += [w for w, _ in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])) if w not in known]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab[:vocab_size]), encoding="utf-8")
    # Loading the folder (only vocab.txt so far) builds the tokenizer the same way in transformers 4 and 5.
    tokenizer = BertTokenizerFast.from_pretrained(str(out_dir), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def make_sample_data(out_dir, num_images: int = 300, seed: int = 0, feat_dim: int = 2048) -> SamplePaths:
    """Write a sample data set under `out_dir` (overwriting its files); see the module docstring."""
    if num_images < 2:
        raise ValueError("the sample needs at least 2 images (the matching task pairs sentences across images)")
    paths = SamplePaths.under(out_dir)
    rng = np.random.default_rng(seed)
    obj_proto = np.maximum(rng.normal(0.5, 1.0, size=(len(OBJECT_NAMES), feat_dim)), 0)
    attr_proto = 0.5 * rng.normal(0, 1.0, size=(len(ATTRIBUTE_NAMES), feat_dim))
    records, annotations = [], []
    for k in range(num_images):
        record, annotation = _image(rng, k, obj_proto, attr_proto, num_boxes=36)
        records.append(record)
        annotations.append(annotation)

    for p in (paths.features_tsv, paths.train_json):
        p.parent.mkdir(parents=True, exist_ok=True)
    write_feature_tsv(paths.features_tsv, records)
    # the class names of the features' obj_ids, where lxmert_fast.visualize looks for them
    # (as Visual Genome's "name,synonym" lines: the plural too, so that it counts as an object word in validation)
    (paths.features_tsv.parent / OBJECTS_VOCAB).write_text(
        "".join(f"{one},{many}\n" if many != one else f"{one}\n" for one, many in OBJECTS))
    num_valid = max(1, num_images // 10)
    for path, part in ((paths.train_json, annotations[:-num_valid]), (paths.valid_json, annotations[-num_valid:])):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(part, f)
    table = _answer_table()
    with open(paths.answer_table, "w", encoding="utf-8") as f:
        json.dump(table, f)

    texts = [s for a in annotations for sents in a["sentf"].values() for s in sents]
    texts += [e["ans"] for e in table] + list(_NUMBER_WORDS) + ["grey", "dunno", "the", "a", "an"]
    build_wordpiece_vocab(texts, paths.tokenizer_dir)
    return paths


def ensure_sample_data(root, num_images: int = 300, seed: int = 0, feat_dim: int = 2048) -> SamplePaths:
    """Return the sample data under `root`, generating it first unless a complete one with these parameters is
    there. Generation is atomic (built in a temporary sibling, then renamed) and serialised across processes. A
    non-empty `root` that is not a sample data folder is never deleted: that raises FileExistsError."""
    root = Path(root)
    params = {"version": _VERSION, "num_images": num_images, "seed": seed, "feat_dim": feat_dim}
    marker = root / "sample_data.json"
    with build_lock(root):
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return SamplePaths.under(root)
        if root.exists() and any(root.iterdir()) and not marker.is_file():
            raise FileExistsError(f"{root} exists and is not a sample data folder; pick another directory")
        remove_stale_staging(root)
        with staging_dir(root) as tmp:
            make_sample_data(tmp, num_images=num_images, seed=seed, feat_dim=feat_dim)
            (tmp / "sample_data.json").write_text(json.dumps(params))
            publish_dir(tmp, root)
    return SamplePaths.under(root)
