"""Learnable sample data for VQA, GQA and NLVR2 in the released formats, on the pre-training sample's images.

The images are those of the pre-training sample (`ensure_sample_data`), as VQA and GQA reuse COCO / Visual Genome
images that LXMERT was pre-trained on; the fine-tuning train split uses the pre-training train images, valid and
test the held-out valid images. Questions and statements are made from what each image holds (its boxes' object
and attribute labels in the feature store, which determine its features), in the generator's vocabulary:
    VQA    "how many dogs are there?" (the pre-training sample's own count question, answers normalised),
           "what color is the dog?", "is there a cat in the picture?" / "are there any cats?"; soft scores with
           occasional secondary answers; as in the released files, a label holds only answers of the vocabulary
    GQA    "what is the red object?", "what color is the dog?", "is the dog red?"
    NLVR2  statements on object presence in a pair: "there is a dog in each image", "exactly one image contains a
           dog", "the left image contains a dog and the right image does not", ...; each statement comes with four
           image pairs, half true, so consistency is measurable
Files under `<sample root>/finetune/`: `{vqa,gqa,nlvr2}/{train,valid,test}.json` (test: the valid questions
without labels for VQA / GQA) and `{vqa,gqa}/trainval_{ans2label,label2ans}.json`.

Public API
    FinetuneSamplePaths     .root, .features_tsv, .tokenizer_dir, .answer_table, .split(task, name),
                            .ans2label(task), .label2ans(task)
    ensure_finetune_sample(sample: SamplePaths, seed=0) -> FinetuneSamplePaths   (atomic, re-used when complete)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .feature_store import FeatureStore
from .formats import normalize_answer, read_pretrain_json
from .fsutil import build_lock, publish_dir, remove_stale_staging, staging_dir

# The pre-training sample generator's scheme: object k < NUM_FOREGROUND is a foreground kind, with its plural.
from .sample import ATTRIBUTE_NAMES, NUM_FOREGROUND, OBJECT_NAMES, OBJECTS, SamplePaths

_VERSION = 3  # 2: labels hold only answers of the vocabulary, as the released files' do; 3: an NLVR2 pair's two
# images differ, and NLVR2 draws from its own generator


@dataclass(frozen=True)
class FinetuneSamplePaths:
    root: Path
    features_tsv: Path
    tokenizer_dir: Path
    answer_table: Path  # the pre-training all_ans.json (for --load-lxmert-qa)

    def split(self, task: str, name: str) -> Path:
        return self.root / task / f"{name}.json"

    def ans2label(self, task: str) -> Path:
        return self.root / task / "trainval_ans2label.json"

    def label2ans(self, task: str) -> Path:
        return self.root / task / "trainval_label2ans.json"


def _image_contents(store: FeatureStore, img_id: str) -> dict[int, int]:
    """{foreground object id: its colour id} of one image, from its boxes' labels."""
    row = store.row(img_id)
    nb = int(store.num_boxes[row])
    contents = {}
    for obj, attr in zip(store.obj_ids[row][:nb].tolist(), store.attr_ids[row][:nb].tolist(), strict=True):
        if obj < NUM_FOREGROUND:
            contents.setdefault(obj, attr)
    return contents


def _vqa(rng, img_id: str, contents: dict[int, int], annotation: dict, qid: int) -> list[dict]:
    out = []

    def add(sent, label, answer_type, question_type):
        out.append(
            {
                "question_id": qid + len(out),
                "img_id": img_id,
                "sent": sent,
                "label": label,
                "answer_type": answer_type,
                "question_type": question_type,
            }
        )

    # The pre-training sample's count question (its first VQA question), with released-style normalised answers.
    sent, label = annotation["sentf"]["vqa"][0], annotation["labelf"]["vqa"][0]
    if sent.startswith("how many"):
        normalised: dict[str, float] = {}
        for ans, score in label.items():
            key = normalize_answer(ans)
            normalised[key] = max(score, normalised.get(key, 0.0))
        add(sent, normalised, "number", "how many")
    for obj, colour in contents.items():
        label = {ATTRIBUTE_NAMES[colour]: 1.0}
        if rng.random() < 0.3:  # annotators disagree a little
            other = ATTRIBUTE_NAMES[int(rng.integers(len(ATTRIBUTE_NAMES)))]
            label.setdefault(other, 0.3)
        add(f"what color is the {OBJECT_NAMES[obj]}?", label, "other", "what color is the")
    present = list(contents)
    absent = [k for k in range(NUM_FOREGROUND) if k not in contents]
    for obj, answer in ((int(rng.choice(present)), "yes"), (int(rng.choice(absent)), "no")):
        if rng.random() < 0.5:
            add(f"is there a {OBJECT_NAMES[obj]} in the picture?", {answer: 1.0}, "yes/no", "is there a")
        else:
            add(f"are there any {OBJECTS[obj][1]}?", {answer: 1.0}, "yes/no", "are there")
    return out


def _gqa(rng, img_id: str, contents: dict[int, int], qid: int) -> list[dict]:
    out = []

    def add(sent, answer):
        out.append({"question_id": f"{qid + len(out):08d}", "img_id": img_id, "sent": sent, "label": {answer: 1.0}})

    for obj, colour in contents.items():
        add(f"what is the {ATTRIBUTE_NAMES[colour]} object?", OBJECT_NAMES[obj])
        if rng.random() < 0.5:
            add(f"what color is the {OBJECT_NAMES[obj]}?", ATTRIBUTE_NAMES[colour])
        else:
            asked = colour if rng.random() < 0.5 else int(rng.integers(len(ATTRIBUTE_NAMES)))
            add(f"is the {OBJECT_NAMES[obj]} {ATTRIBUTE_NAMES[asked]}?", "yes" if asked == colour else "no")
    return out


# Statement templates over (left holds the object, right holds it) -> truth.
_NLVR2_TEMPLATES = (
    ("there is a {} in each image", lambda a, b: a and b),
    ("exactly one image contains a {}", lambda a, b: a != b),
    ("the left image contains a {} and the right image does not", lambda a, b: a and not b),
    ("neither image contains a {}", lambda a, b: not a and not b),
    ("at least one image contains a {}", lambda a, b: a or b),
)


def _nlvr2(rng, split: str, contents: dict[str, dict[int, int]], num_sentences: int) -> list[dict]:
    images = sorted(contents)
    holding = {obj: [i for i in images if obj in contents[i]] for obj in range(NUM_FOREGROUND)}
    lacking = {obj: [i for i in images if obj not in contents[i]] for obj in range(NUM_FOREGROUND)}
    # objects in two images or more and missing from two or more: every pattern has a pair of two different images,
    # as NLVR2's pairs are (a split of a few images may have none: then one image may stand on both sides)
    usable = ([obj for obj in range(NUM_FOREGROUND) if len(holding[obj]) > 1 and len(lacking[obj]) > 1]
              or [obj for obj in range(NUM_FOREGROUND) if holding[obj] and lacking[obj]])
    out = []
    for s in range(num_sentences):
        obj = int(rng.choice(usable))
        template, truth = _NLVR2_TEMPLATES[int(rng.integers(len(_NLVR2_TEMPLATES)))]
        patterns = {y: [(a, b) for a in (True, False) for b in (True, False) if truth(a, b) == y] for y in (0, 1)}
        for n, label in enumerate(rng.permutation([0, 0, 1, 1]).tolist()):
            a, b = patterns[label][int(rng.integers(len(patterns[label])))]
            img0 = str(rng.choice(holding[obj] if a else lacking[obj]))
            img1 = str(rng.choice([i for i in (holding[obj] if b else lacking[obj]) if i != img0] or [img0]))
            out.append(
                {
                    "identifier": f"{split}-{s}-{n}-0",  # split-set-pair-sentence: 4 pairs, 1 sentence
                    "img0": img0,
                    "img1": img1,
                    "sent": template.format(OBJECT_NAMES[obj]),
                    "label": int(label),
                }
            )
    return out


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def make_finetune_sample(sample: SamplePaths, out_dir, seed: int = 0) -> FinetuneSamplePaths:
    """Write the three tasks' sample files under `out_dir` (overwriting); see the module docstring."""
    paths = FinetuneSamplePaths(Path(out_dir), sample.features_tsv, sample.tokenizer_dir, sample.answer_table)
    store = FeatureStore.from_tsv(sample.features_tsv, progress=False)
    rng = np.random.default_rng(seed)
    pairs_rng = np.random.default_rng([seed, 1])  # NLVR2's own draws: a change to its pairs leaves VQA and GQA be
    splits = {}
    for split, source in (("train", sample.train_json), ("valid", sample.valid_json)):
        annotations = [a for a in read_pretrain_json(source) if a["img_id"] in store]
        contents = {a["img_id"]: _image_contents(store, a["img_id"]) for a in annotations}
        vqa, gqa = [], []
        base = 1_000_000 if split == "train" else 2_000_000
        for a in annotations:
            if not contents[a["img_id"]]:
                continue
            vqa += _vqa(rng, a["img_id"], contents[a["img_id"]], a, base + len(vqa))
            gqa += _gqa(rng, a["img_id"], contents[a["img_id"]], base + len(gqa))
        nlvr2 = _nlvr2(pairs_rng, split, contents, num_sentences=max(4, int(1.5 * len(annotations))))
        splits[split] = {"vqa": vqa, "gqa": gqa, "nlvr2": nlvr2}
    for task in ("vqa", "gqa"):
        # trainval: every answer given with full confidence in train or valid; the labels keep only those, as the
        # released preprocessing kept only the vocabulary's answers
        records = splits["train"][task] + splits["valid"][task]
        vocabulary = {a for r in records for a, s in r["label"].items() if s >= 1.0}
        answers = sorted(vocabulary)
        for r in records:
            r["label"] = {a: s for a, s in r["label"].items() if a in vocabulary}
        _write_json(paths.ans2label(task), {a: i for i, a in enumerate(answers)})
        _write_json(paths.label2ans(task), answers)
    for split, tasks in splits.items():
        for task, records in tasks.items():
            _write_json(paths.split(task, split), records)
            if split == "valid":
                if task == "nlvr2":  # NLVR2's public test split is labelled
                    test = [{**r, "identifier": r["identifier"].replace("valid-", "test-", 1)} for r in records]
                else:
                    test = [{k: v for k, v in r.items() if k != "label"} for r in records]
                _write_json(paths.split(task, "test"), test)
    return paths


def ensure_finetune_sample(sample: SamplePaths, seed: int = 0) -> FinetuneSamplePaths:
    """The fine-tuning sample under `<sample.root>/finetune`, generated first unless a complete one made from this
    pre-training sample with this seed is there. Atomic and safe when several processes call it at once."""
    root = Path(sample.root) / "finetune"
    params = {"version": _VERSION, "seed": seed, "sample": json.loads((sample.root / "sample_data.json").read_text())}
    marker = root / "finetune_sample.json"
    with build_lock(root):
        if not (marker.is_file() and json.loads(marker.read_text()) == params):
            remove_stale_staging(root)
            with staging_dir(root) as tmp:
                make_finetune_sample(sample, tmp, seed)
                (tmp / "finetune_sample.json").write_text(json.dumps(params))
                publish_dir(tmp, root)
    return FinetuneSamplePaths(root, sample.features_tsv, sample.tokenizer_dir, sample.answer_table)


__all__ = ["FinetuneSamplePaths", "ensure_finetune_sample", "make_finetune_sample"]
