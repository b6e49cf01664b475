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

Transient failures (a refused or dropped connection, HTTP 408, 429 and 5xx, a transfer cut short) are retried
(--retries, default 3) after a wait that doubles each time (--retry-wait, default 2 s), each retry resuming the
partial file; then the file's next source is tried. Sources, in order: the release's hosts and their mirrors
(HOSTS: the UNC server under both of its names; GitHub's raw files and the same files through github.com), or
--base-url URL[,URL...] (or the environment variable LXMERT_DATA_BASE_URL): hosts that serve the release's paths,
mirrors or a local server in the tests, in place of the release's.

Checksums: every file's sha256 is recorded in the manifest when it is first complete (the release publishes none;
RELEASE_SHA256 pins those that are known) and every later download of it, a resumed one included, must match it:
a file that does not is deleted and named with both digests. `--verify` hashes the files in place against the
manifest and refetches none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lxmert_fast.cli import plural
from lxmert_fast.errors import DownloadError
from lxmert_fast.files import atomic_path, write_text

# Each host's sources, tried in order: the same paths under every one.
HOSTS = {
    "unc": ("https://nlp.cs.unc.edu/data", "https://nlp1.cs.unc.edu/data"),  # the UNC server's two names
    "github": ("https://raw.githubusercontent.com", "https://github.com/{owner}/{repo}/raw/{rest}"),
    "hf": ("https://huggingface.co",),
}
# sha256 of release files known ahead of the first download (none yet: recorded in the manifest on first download)
RELEASE_SHA256: dict[str, str] = {}
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
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

# The bottom-up-attention detector (python -m lxmert_fast.extract --weights data/detector/pytorch_model.bin). Its
# sha256 is recorded in the manifest on the first download and every later fetch must match it.
DETECTOR = Remote("hf", "unc-nlp/frcnn-vg-finetuned/resolve/main/pytorch_model.bin", "detector/pytorch_model.bin")

RELEASE = {
    "detector": [DETECTOR],
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
def urls_of(remote: Remote, base_urls: list[str] | None = None) -> list[str]:
    """Where `remote` can be fetched, in order: the given hosts, else the release's host and its mirrors."""
    urls = []
    for base in base_urls or HOSTS[remote.host]:
        if "{rest}" in base:  # github.com's form of a raw file: /owner/repo/raw/branch/path
            owner, repo, rest = remote.path.split("/", 2)
            urls.append(base.format(owner=owner, repo=repo, rest=rest))
        else:
            urls.append(f"{base.rstrip('/')}/{remote.path}")
    return urls


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
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}", transient=e.code in TRANSIENT_HTTP) from e
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out: worth another try
        raise DownloadError(f"{url}: {getattr(e, 'reason', e)}", transient=True) from e
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
            + (" (too many: the partial file was deleted)" if size > total else "; run the command again to resume"),
            transient=size < total,
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
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, entry: dict, pinned: str | None = None) -> None:
    """The file's sha256 must equal the pinned one, else the one recorded by an earlier download (recorded now if
    there is none); a file that does not match is deleted."""
    actual, expected = sha256_of(path), pinned or entry.get("sha256")
    if expected is not None and actual != expected:
        path.unlink()
        raise DownloadError(f"{path}: sha256 {actual} differs from the expected {expected} (the file was deleted; "
                            "if the release really changed, delete its entry in the manifest and fetch it again)")
    entry["sha256"] = actual


def fetch_file(urls: list[str], dest: Path, entry: dict, retries: int = 3, retry_wait: float = 2.0,
               progress: bool = True, log=print) -> int:
    """Download `dest` from the first of `urls` that works, each retried on transient failures with a doubling
    wait (each retry resumes the partial file); returns the size. `entry` is the file's manifest entry."""
    failures = []
    for url in urls:
        for attempt in range(retries + 1):
            try:
                return download_file(url, dest, entry.get("bytes"), progress)
            except DownloadError as error:
                if not error.transient or attempt == retries:
                    failures.append(str(error))
                    break
                wait = retry_wait * 2**attempt
                log(f"{error}; retry {attempt + 1} of {retries} in {wait:g} s")
                time.sleep(wait)
    raise DownloadError(f"{dest.name}: no source worked:\n  " + "\n  ".join(failures))


def _load_manifest(root: Path) -> dict:
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_manifest(root: Path, manifest: dict) -> None:
    write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _fetch_remote(remote: Remote, root: Path, manifest: dict, base_urls, retries, retry_wait, progress, log) -> Path:
    final = root / remote.dest
    target = final.with_suffix(".zip") if remote.is_zip else final
    urls = urls_of(remote, base_urls)
    log(f"fetching {urls[0]}")
    entry = manifest.setdefault(remote.path, {})
    entry["bytes"] = fetch_file(urls, target, entry, retries, retry_wait, progress, log)
    _check_sha256(target, entry, RELEASE_SHA256.get(remote.path))
    _save_manifest(root, manifest)
    if remote.is_zip:
        log(f"unpacking {target.name}")
        unpack_tsv(target, final)
        entry["unpacked_sha256"] = sha256_of(final)
        _save_manifest(root, manifest)
    return final


def fetch(parts, root, base_url: str | None = None, progress: bool = True, log=print, retries: int = 3,
          retry_wait: float = 2.0) -> list[Path]:
    """Download and unpack the files of `parts` (keys of RELEASE) under `root`; returns the paths in place.
    `base_url`: hosts (comma-separated) that serve the release's paths, tried in order, instead of the release's."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base_urls = [u for u in (base_url or os.environ.get(BASE_URL_ENV) or "").split(",") if u] or None
    manifest = _load_manifest(root)
    remotes = list(dict.fromkeys(r for part in parts for r in RELEASE[part]))  # in order, each once
    done = []
    for remote in remotes:
        final = root / remote.dest
        if final.is_file() and "bytes" in manifest.get(remote.path, {}):
            log(f"have {final}")
            done.append(final)
            continue
        done.append(_fetch_remote(remote, root, manifest, base_urls, retries, retry_wait, progress, log))
    if "nlvr2" in parts:
        for split, raw in NLVR2_RAW.items():
            done.append(convert_nlvr2(root / "nlvr2" / "raw" / f"{raw}.json", root / "nlvr2" / f"{split}.json", split))
    return done


def verify(parts, root, log=print) -> list[str]:
    """Hash the files of `parts` in place against the manifest; returns the problems found (nothing is fetched)."""
    root, problems = Path(root), []
    manifest = _load_manifest(root)
    for remote in dict.fromkeys(r for part in parts for r in RELEASE[part]):
        path, entry = root / remote.dest, manifest.get(remote.path, {})
        expected = entry.get("unpacked_sha256" if remote.is_zip else "sha256")
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif expected is None:
            problems.append(f"{path}: no checksum recorded in {root / MANIFEST}")
        elif sha256_of(path) != expected:
            problems.append(f"{path}: sha256 differs from the one recorded when it was downloaded")
        else:
            log(f"ok {path}")
    return problems


def download_hint(paths) -> str:
    """"; fetch them with: python -m lxmert_fast.data.download pretrain --dir data" for missing `paths` that are
    all release files (as the parts lay them out under one --dir), naming the fewest parts that hold them all; ""
    when some are not release files."""
    holders, roots = [], set()
    for path in map(Path, paths):
        parts = {part for part, remotes in RELEASE.items() for r in remotes
                 if len(path.parts) > len(Path(r.dest).parts) and path.as_posix().endswith("/" + r.dest)}
        if not parts:
            return ""
        dest = next(r.dest for r in RELEASE[min(parts)] if path.as_posix().endswith("/" + r.dest))
        roots.add(Path(*path.parts[: len(path.parts) - len(Path(dest).parts)]).as_posix())
        holders.append(parts)
    if len(roots) != 1:
        return ""
    chosen = []
    while holders:  # greedily, the part that holds most of what is still missing
        best = max(RELEASE, key=lambda part: sum(part in h for h in holders))
        chosen.append(best)
        holders = [h for h in holders if best not in h]
    parts = " ".join(sorted(chosen, key=list(RELEASE).index))
    return f"; fetch them with: python -m lxmert_fast.data.download {parts} --dir {roots.pop()}"


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


def mirror_layout() -> str:
    """What a host given with --base-url must serve: each part's paths, and where each lands under --dir."""
    lines = ["a --base-url host serves these paths (-> where each lands under --dir):"]
    for part, remotes in RELEASE.items():
        lines.append(f"  {part}:")
        lines += [f"    /{r.path}  ->  {r.dest}" for r in remotes]
    return "\n".join(lines)


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m lxmert_fast.data.download",
        description="Fetch the original LXMERT release (annotations, features, model_LXRT.pth) and print the "
        "command that trains on it.",
        epilog=mirror_layout(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("parts", nargs="+", choices=sorted(RELEASE), help="what to fetch")
    parser.add_argument("--dir", default="data", help="where to put it (default: data)")
    parser.add_argument(
        "--base-url", help="hosts serving the release's paths (comma-separated, tried in order) instead of the "
        f"release's hosts and mirrors (env {BASE_URL_ENV}); a host serves <url>/lxmert_data/..., <url>/model_LXRT.pth "
        "and <url>/airsplay/lxmert/master/data/... as the layout above"
    )
    parser.add_argument("--retries", type=int, default=3, help="retries of a transient failure, per source")
    parser.add_argument("--retry-wait", type=float, default=2.0, help="seconds before the first retry (then doubled)")
    parser.add_argument("--verify", action="store_true", help="check the files in place against their checksums")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.verify:
        problems = verify(args.parts, args.dir)
        if problems:
            raise DownloadError("verification failed:\n  " + "\n  ".join(problems))
        return []
    paths = fetch(args.parts, args.dir, args.base_url, progress=not args.no_progress, retries=args.retries,
                  retry_wait=args.retry_wait)
    print(f"\n{plural(len(paths), 'file')} in place under {args.dir}. Train on them with:\n")
    for command in commands(args.parts, args.dir):
        print(command + "\n")
    return paths


if __name__ == "__main__":
    from lxmert_fast.cli import run

    run(main)
