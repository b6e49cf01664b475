"""Fetch the original LXMERT release: annotations, answer tables, object features and the pre-trained weights.

    python -m lxmert_fast.data.download pretrain|vqa|gqa|nlvr2 [more ...] --dir data/

The files and URLs are those of the original repository's README (airsplay/lxmert): the JSON files and feature zips
on the UNC server, the answer tables (`all_ans.json`, `trainval_ans2label.json`) from the repository itself, NLVR2's
statements from lil-lab/nlvr (converted to the original's `{identifier, img0, img1, sent, label}` records), and the
pre-trained `model_LXRT.pth`. Layout under --dir, as the original and our recipes (configs/recipe_*.json) expect:
    lxmert/{mscoco_train,mscoco_nominival,mscoco_minival,vgnococo,all_ans}.json
    vqa/{train,nominival,minival,test,trainval_ans2label,trainval_label2ans}.json
    gqa/{train,valid,testdev,submit,trainval_ans2label,trainval_label2ans}.json
    nlvr2/{train,valid,test}.json
    mscoco_imgfeat/{train2014,val2014,test2015}_obj36.tsv, vg_gqa_imgfeat/{vg_gqa,gqa_testdev}_obj36.tsv,
    nlvr2_imgfeat/{train,valid,test}_obj36.tsv
    pretrained/model_LXRT.pth

Each file is downloaded to `<name>.part` with a progress bar and renamed when complete. An interrupted download is
resumed from where it stopped (an HTTP Range request); the received size must equal the server's Content-Length
(and the size recorded in `<dir>/download_manifest.json` by an earlier run, where there is one), otherwise the
download stops with an error naming the URL and both sizes. Zips are unpacked (the TSV inside is moved to its place,
whatever folder the zip holds it in) and deleted. Files already complete are skipped, so a rerun only fetches what is
missing. At the end the pre-training or fine-tuning command for what was fetched is printed.

--base-url URL (or the environment variable LXMERT_DATA_BASE_URL) replaces both hosts (the UNC server and
raw.githubusercontent.com) by one, which serves the same paths: a mirror, or a local server in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lxmert_fast.errors import DownloadError
from lxmert_fast.files import atomic_path, write_text

HOSTS = {"unc": "https://nlp.cs.unc.edu/data", "github": "https://raw.githubusercontent.com"}
BASE_URL_ENV = "LXMERT_DATA_BASE_URL"
MANIFEST = "download_manifest.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One file of the release: where it lives (host key + path) and where it goes under --dir."""

    host: str
    path: str
    dest: str  # relative to --dir; for a zip, the TSV it unpacks to

    @property
    def is_zip(self) -> bool:
        return self.path.endswith(".zip")


def _unc(path: str, dest: str | None = None) -> Remote:
    return Remote("unc", f"lxmert_data/{path}", dest or path)


def _features(folder: str, name: str) -> Remote:
    return _unc(f"{folder}/{name}.zip", f"{folder}/{name}.tsv")


def _github(path: str) -> Remote:
    return Remote("github", f"airsplay/lxmert/master/data/{path}", path)


MODEL = Remote("unc", "model_LXRT.pth", "pretrained/model_LXRT.pth")
ALL_ANS = _github("lxmert/all_ans.json")
# NLVR2's raw statements (JSON lines) -> the original's split names
NLVR2_RAW = {"train": "train", "valid": "dev", "test": "test1"}

RELEASE = {
    "pretrain": [
        *(_unc(f"lxmert/{n}.json") for n in ("mscoco_train", "mscoco_nominival", "mscoco_minival", "vgnococo")),
        ALL_ANS,
        _features("mscoco_imgfeat", "train2014_obj36"),
        _features("mscoco_imgfeat", "val2014_obj36"),
        _features("vg_gqa_imgfeat", "vg_gqa_obj36"),
    ],
    "vqa": [
        *(_unc(f"vqa/{n}.json") for n in ("train", "nominival", "minival", "test")),
        _github("vqa/trainval_ans2label.json"),
        _github("vqa/trainval_label2ans.json"),
        ALL_ANS,
        _features("mscoco_imgfeat", "train2014_obj36"),
        _features("mscoco_imgfeat", "val2014_obj36"),
        _features("mscoco_imgfeat", "test2015_obj36"),
        MODEL,
    ],
    "gqa": [
        *(_unc(f"gqa/{n}.json") for n in ("train", "valid", "testdev", "submit")),
        _github("gqa/trainval_ans2label.json"),
        _github("gqa/trainval_label2ans.json"),
        ALL_ANS,
        _features("vg_gqa_imgfeat", "vg_gqa_obj36"),
        _features("vg_gqa_imgfeat", "gqa_testdev_obj36"),
        MODEL,
    ],
    "nlvr2": [
        *(
            Remote("github", f"lil-lab/nlvr/master/nlvr2/data/{raw}.json", f"nlvr2/raw/{raw}.json")
            for raw in NLVR2_RAW.values()
        ),
        _features("nlvr2_imgfeat", "train_obj36"),
        _features("nlvr2_imgfeat", "valid_obj36"),
        _features("nlvr2_imgfeat", "test_obj36"),
        MODEL,
    ],
}


# --------------------------------------------------------------------------------------------------- one file
def url_of(remote: Remote, base_url: str | None = None) -> str:
    return f"{(base_url or HOSTS[remote.host]).rstrip('/')}/{remote.path}"


def _progress(total, initial, name):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False)


def download_file(url: str, dest: Path, expected_size: int | None = None, progress: bool = True) -> int:
    """Download `url` to `dest` through `dest.part`, resuming a partial one; returns the size in bytes.

    The size must equal Content-Length (the whole file's, from Content-Range on a resumed request) and
    `expected_size` when given. A transfer that stops early keeps the `.part` file for the next call to resume."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is not a prefix of this file (longer): start again
            part.unlink()
            return download_file(url, dest, expected_size, progress)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: {e.reason}") from e
    with response:
        if response.status == 206:
            total = int(response.headers["Content-Range"].rsplit("/", 1)[1])
        else:  # a full answer (the server ignores Range, or there was nothing to resume)
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(
                f"{url}: the server has {total} bytes, {expected_size} were expected (from {MANIFEST}); "
                f"delete {dest} and its entry there to fetch the new file"
            )
        total = expected_size if total is None else total
        bar = _progress(total, have, dest.name) if progress else None
        with open(part, "ab" if have else "wb") as f:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            except (OSError, ValueError) as e:  # connection dropped mid-way (IncompleteRead is a ValueError)
                # http.client's IncompleteRead carries the bytes received before the drop
                f.write(getattr(e, "partial", b"") or b"")
            finally:
                if bar is not None:
                    bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise DownloadError(
            f"{url}: received {size} bytes of {total}"
            + (" (too many: the partial file was deleted)" if size > total else "; run the command again to resume")
        )
    os.replace(part, dest)
    return size


def unpack_tsv(zip_path: Path, tsv_path: Path) -> Path:
    """Extract the TSV named like `tsv_path` from the zip (in whichever folder the zip keeps it), then delete the
    zip. The original's zips differ in that folder, so the member is found by its file name."""
    with zipfile.ZipFile(zip_path) as z:
        members = [m for m in z.namelist() if Path(m).name == tsv_path.name]
        if not members:
            raise DownloadError(f"{zip_path}: no member named {tsv_path.name} (it holds {z.namelist()[:5]})")
        with atomic_path(tsv_path) as tmp, z.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    zip_path.unlink()
    return tsv_path


def convert_nlvr2(raw_json: Path, out_json: Path, split: str) -> Path:
    """NLVR2's JSON-lines statements -> the original's records (its process_dataset.py): the images of pair
    "dev-850-0-3" are "dev-850-0-img0" / "-img1", the label 1 for "True"."""
    records = []
    with open(raw_json, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                stem = raw["identifier"].rsplit("-", 1)[0]
                label = {"True": 1, "False": 0}[raw["label"]]
                sent = raw["sentence"]
            except (ValueError, KeyError) as e:
                raise DownloadError(f"{raw_json}:{line_no}: not an NLVR2 statement ({e!r})") from e
            records.append(
                {
                    "identifier": raw["identifier"],
                    "img0": f"{stem}-img0",
                    "img1": f"{stem}-img1",
                    "label": label,
                    "sent": sent,
                    "uid": f"nlvr2_{split}_{len(records)}",
                }
            )
    out_json.write_text(json.dumps(records))
    return out_json


# ------------------------------------------------------------------------------------------------ a release
def _load_manifest(root: Path) -> dict:
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_manifest(root: Path, manifest: dict) -> None:
    write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def fetch(parts, root, base_url: str | None = None, progress: bool = True, log=print) -> list[Path]:
    """Download and unpack the files of `parts` (keys of RELEASE) under `root`; returns the paths in place."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    manifest = _load_manifest(root)
    remotes = list(dict.fromkeys(r for part in parts for r in RELEASE[part]))  # in order, each once
    done = []
    for remote in remotes:
        url, final = url_of(remote, base_url), root / remote.dest
        if final.is_file() and remote.path in manifest:
            log(f"have {final}")
            done.append(final)
            continue
        target = final.with_suffix(".zip") if remote.is_zip else final
        log(f"fetching {url}")
        size = download_file(url, target, manifest.get(remote.path, {}).get("bytes"), progress)
        manifest[remote.path] = {"bytes": size, "url": url}
        _save_manifest(root, manifest)
        if remote.is_zip:
            log(f"unpacking {target.name}")
            unpack_tsv(target, final)
        done.append(final)
    if "nlvr2" in parts:
        for split, raw in NLVR2_RAW.items():
            done.append(convert_nlvr2(root / "nlvr2" / "raw" / f"{raw}.json", root / "nlvr2" / f"{split}.json", split))
    return done


# ---------------------------------------------------------------------------------------------- the commands
def commands(parts, root) -> list[str]:
    """The pre-training / fine-tuning commands for data fetched under `root` (paths as given, e.g. "data")."""

    def p(*names):
        return ",".join(str(Path(root) / n) for n in names)

    model, all_ans = p(MODEL.dest), p(ALL_ANS.dest)
    out = []
    if "pretrain" in parts:
        train = p("lxmert/mscoco_train.json", "lxmert/mscoco_nominival.json", "lxmert/vgnococo.json")
        features = p(
            "mscoco_imgfeat/train2014_obj36.tsv", "mscoco_imgfeat/val2014_obj36.tsv", "vg_gqa_imgfeat/vg_gqa_obj36.tsv"
        )
        out.append(
            "deepspeed lxmert_fast/pretrain.py --config configs/recipe_lxmert_paper.json \\\n"
            f"    --train-json {train} \\\n"
            f"    --valid-json {p('lxmert/mscoco_minival.json')} \\\n"
            f"    --features {features} \\\n"
            f"    --answer-table {all_ans} --tokenizer bert-base-uncased"
        )
    tasks = {
        "vqa": (("train", "nominival"), "minival", "test", ("mscoco_imgfeat", ("train2014", "val2014", "test2015"))),
        "gqa": (("train", "valid"), "testdev", "submit", ("vg_gqa_imgfeat", ("vg_gqa", "gqa_testdev"))),
        "nlvr2": (("train",), "valid", "test", ("nlvr2_imgfeat", ("train", "valid", "test"))),
    }
    for task, (train, valid, test, (folder, tsvs)) in tasks.items():
        if task not in parts:
            continue
        answers = (
            f"    --ans2label {p(f'{task}/trainval_ans2label.json')} --answer-table {all_ans} \\\n"
            f"    --load-lxmert-qa {model}"
            if task != "nlvr2"
            else f"    --load {model}"
        )
        out.append(
            f"deepspeed lxmert_fast/finetune.py --task {task} --config configs/recipe_finetune_{task}.json \\\n"
            f"    --train {p(*(f'{task}/{s}.json' for s in train))} --valid {p(f'{task}/{valid}.json')} "
            f"--test-json {p(f'{task}/{test}.json')} \\\n"
            f"    --features {p(*(f'{folder}/{s}_obj36.tsv' for s in tsvs))} \\\n"
            f"{answers} --tokenizer bert-base-uncased --test"
        )
    return out


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m lxmert_fast.data.download",
        description="Fetch the original LXMERT release (annotations, features, model_LXRT.pth) and print the "
        "command that trains on it.",
    )
    parser.add_argument("parts", nargs="+", choices=sorted(RELEASE), help="what to fetch")
    parser.add_argument("--dir", default="data", help="where to put it (default: data)")
    parser.add_argument(
        "--base-url", help=f"one host serving the release's paths instead of the original hosts (env {BASE_URL_ENV})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    paths = fetch(args.parts, args.dir, args.base_url, progress=not args.no_progress)
    print(f"\n{len(paths)} files in place under {args.dir}. Train on them with:\n")
    for command in commands(args.parts, args.dir):
        print(command + "\n")
    return paths


if __name__ == "__main__":
    from lxmert_fast.cli import run

    run(main)
