"""lxmert_fast.data.download against a local HTTP server on 127.0.0.1 that serves small files laid out like the
release (the UNC server's and GitHub's paths under one root); no test reaches the internet."""

import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest

from lxmert_fast.data import download
from lxmert_fast.errors import DownloadError


class ReleaseHandler(http.server.BaseHTTPRequestHandler):
    """GET with Range support; `server.cut[path] = n` makes the server drop the connection after n bytes,
    `server.unavailable[path] = n` answers the next n requests for it with HTTP 503."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.requests.append((self.path, self.headers.get("Range")))
        if self.server.unavailable.get(self.path.lstrip("/"), 0) > 0:
            self.server.unavailable[self.path.lstrip("/")] -= 1
            self.send_error(503)
            return
        body = self.server.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = self.server.cut.pop(self.path.lstrip("/"), None)
        self.wfile.write(body[start:cut])
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


def _zip(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, data)
    return buf.getvalue()


def release_files(part: str) -> dict[str, bytes]:
    """Small stand-ins for every file of `part`, keyed by their path on the (single) server."""
    files = {}
    for remote in download.RELEASE[part]:
        if remote.is_zip:
            # the original's zips keep the TSV at different depths: one under a folder, the others at the top
            name = Path(remote.dest).name
            member = f"{Path(remote.dest).parent.name}/{name}" if "val" in name else name
            files[remote.path] = _zip(member, f"img\t{remote.dest}\n".encode() * 50)
        elif "nlvr2/data" in remote.path:
            rows = [
                {"identifier": "dev-850-0-3", "sentence": "there is a dog", "label": "True"},
                {"identifier": "dev-850-0-4", "sentence": "there is a dog", "label": "False"},
            ]
            files[remote.path] = "".join(json.dumps(r) + "\n" for r in rows).encode()
        else:
            files[remote.path] = json.dumps({"file": remote.path, "pad": "x" * 3000}).encode()
    return files


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReleaseHandler)
    httpd.files, httpd.cut, httpd.unavailable, httpd.requests = {}, {}, {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_fetches_unpacks_and_prints_the_finetune_command(server, tmp_path, capsys):
    server.files = release_files("vqa")
    root = tmp_path / "data"
    paths = download.main(["vqa", "--dir", str(root), "--base-url", server.url, "--no-progress"])

    assert (root / "vqa" / "train.json").read_bytes() == server.files["lxmert_data/vqa/train.json"]
    assert (root / "pretrained" / "model_LXRT.pth").read_bytes() == server.files["model_LXRT.pth"]
    assert (root / "lxmert" / "all_ans.json").is_file() and (root / "vqa" / "trainval_ans2label.json").is_file()
    for split in ("train2014", "val2014", "test2015"):  # unpacked whatever the zip's folder, zip deleted
        tsv = root / "mscoco_imgfeat" / f"{split}_obj36.tsv"
        assert tsv.read_text().startswith(f"img\tmscoco_imgfeat/{split}_obj36.tsv")
        assert not tsv.with_suffix(".zip").exists()
    assert all(p.is_file() for p in paths) and len(paths) == len(download.RELEASE["vqa"])
    assert not list(root.rglob("*.part"))
    manifest = json.loads((root / download.MANIFEST).read_text())
    assert manifest["model_LXRT.pth"]["bytes"] == len(server.files["model_LXRT.pth"])

    out = capsys.readouterr().out
    assert "deepspeed lxmert_fast/finetune.py --task vqa --config configs/recipe_finetune_vqa.json" in out
    train = f"{root}/vqa/train.json,{root}/vqa/nominival.json"
    assert f"--train {train}" in out and f"--load-lxmert-qa {root}/pretrained/model_LXRT.pth" in out
    # every path the printed command names exists
    command = download.commands(["vqa"], root)[0]
    named = [w for w in command.replace(",", " ").split() if w.startswith(str(root))]
    assert named and all(Path(w).is_file() for w in named)

    # a second run fetches nothing
    server.requests.clear()
    download.main(["vqa", "--dir", str(root), "--base-url", server.url, "--no-progress"])
    assert server.requests == []


def test_resumes_a_truncated_download_with_a_range_request(server, tmp_path):
    body = bytes(range(256)) * 40
    server.files = {"model_LXRT.pth": body}
    server.cut["model_LXRT.pth"] = 3000
    dest = tmp_path / "model_LXRT.pth"
    url = f"{server.url}/model_LXRT.pth"
    with pytest.raises(DownloadError, match="received 3000 bytes of 10240; run the command again"):
        download.download_file(url, dest, progress=False)
    assert not dest.exists() and (tmp_path / "model_LXRT.pth.part").stat().st_size == 3000

    assert download.download_file(url, dest, progress=True) == len(body)
    assert dest.read_bytes() == body
    assert server.requests[-1] == ("/model_LXRT.pth", "bytes=3000-")
    assert not (tmp_path / "model_LXRT.pth.part").exists()


def test_a_partial_file_longer_than_the_remote_one_is_fetched_again(server, tmp_path):
    server.files = {"f.json": b"new content"}
    (tmp_path / "f.json.part").write_bytes(b"an older, longer partial download")
    assert download.download_file(f"{server.url}/f.json", tmp_path / "f.json", progress=False) == 11
    assert (tmp_path / "f.json").read_bytes() == b"new content"


def test_size_mismatch_with_the_manifest_is_an_error(server, tmp_path):
    server.files = release_files("pretrain")
    root = tmp_path / "data"
    download.fetch(["pretrain"], root, server.url, progress=False, log=lambda *_: None)
    path = download.RELEASE["pretrain"][0]
    (root / path.dest).unlink()  # lost locally, and meanwhile the file on the server changed size
    server.files[path.path] += b" "
    with pytest.raises(DownloadError, match=rf"{path.path}: the server has \d+ bytes, \d+ were expected"):
        download.main(["pretrain", "--dir", str(root), "--base-url", server.url, "--no-progress"])
    assert not (root / path.dest).exists()


def test_nlvr2_statements_are_converted_to_the_original_records(server, tmp_path, monkeypatch, capsys):
    server.files = release_files("nlvr2")
    monkeypatch.setenv(download.BASE_URL_ENV, server.url)  # the environment variable instead of --base-url
    download.main(["nlvr2", "--dir", str(tmp_path), "--no-progress"])
    records = json.loads((tmp_path / "nlvr2" / "valid.json").read_text())
    assert records[1] == {
        "identifier": "dev-850-0-4",
        "img0": "dev-850-0-img0",
        "img1": "dev-850-0-img1",
        "label": 0,
        "sent": "there is a dog",
        "uid": "nlvr2_valid_1",
    }
    assert "--task nlvr2" in capsys.readouterr().out


def test_unknown_file_on_the_server_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/missing.json: HTTP 404"):
        download.download_file(f"{server.url}/missing.json", tmp_path / "m.json", progress=False)


def test_the_pretrain_command_matches_the_readme_recipe():
    command = download.commands(["pretrain"], "data")[0]
    assert command.startswith("deepspeed lxmert_fast/pretrain.py --config configs/recipe_lxmert_paper.json")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for flag_value in (
        "--train-json data/lxmert/mscoco_train.json,data/lxmert/mscoco_nominival.json,data/lxmert/vgnococo.json",
        "--valid-json data/lxmert/mscoco_minival.json",
        "--answer-table data/lxmert/all_ans.json --tokenizer bert-base-uncased",
    ):
        assert flag_value in command and flag_value in readme


# ------------------------------------------------------------------------------------ retries, mirrors, checksums
def test_every_file_gets_a_checksum_and_verify_finds_a_corrupted_one(server, tmp_path, capsys):
    server.files = release_files("gqa")
    root = tmp_path / "data"
    download.fetch(["gqa"], root, server.url, progress=False, log=lambda *_: None)
    manifest = json.loads((root / download.MANIFEST).read_text())
    for remote in download.RELEASE["gqa"]:
        assert manifest[remote.path]["sha256"] == hashlib.sha256(server.files[remote.path]).hexdigest()
        if remote.is_zip:  # the unpacked TSV too, for --verify
            unpacked = (root / remote.dest).read_bytes()
            assert manifest[remote.path]["unpacked_sha256"] == hashlib.sha256(unpacked).hexdigest()
    assert download.main(["gqa", "--dir", str(root), "--verify"]) == []

    tsv = root / "vg_gqa_imgfeat" / "vg_gqa_obj36.tsv"
    tsv.write_bytes(tsv.read_bytes().replace(b"img", b"imx", 1))  # same size, other bytes
    with pytest.raises(DownloadError, match=rf"{tsv}: sha256 differs from the one recorded"):
        download.main(["gqa", "--dir", str(root), "--verify"])
    assert tsv.exists()  # verifying deletes nothing


def test_a_refetched_file_that_differs_from_its_recorded_checksum_is_refused(server, tmp_path):
    server.files = release_files("pretrain")
    root = tmp_path / "data"
    download.fetch(["pretrain"], root, server.url, progress=False, log=lambda *_: None)
    path = download.RELEASE["pretrain"][0]
    (root / path.dest).unlink()  # lost locally; meanwhile the server's file changed, same size
    server.files[path.path] = server.files[path.path].replace(b"x", b"y", 1)
    with pytest.raises(DownloadError, match=r"sha256 [0-9a-f]{64} differs from the expected [0-9a-f]{64}"):
        download.fetch(["pretrain"], root, server.url, progress=False, log=lambda *_: None)
    assert not (root / path.dest).exists()


def test_a_pinned_checksum_is_checked_on_the_first_download(server, tmp_path, monkeypatch):
    server.files = {"model_LXRT.pth": b"weights"}
    monkeypatch.setattr(download, "RELEASE", {"w": [download.MODEL]})
    monkeypatch.setitem(download.RELEASE_SHA256, "model_LXRT.pth", "0" * 64)
    with pytest.raises(DownloadError, match="differs from the expected 0000"):
        download.fetch(["w"], tmp_path, server.url, progress=False, log=lambda *_: None)
    monkeypatch.setitem(download.RELEASE_SHA256, "model_LXRT.pth", hashlib.sha256(b"weights").hexdigest())
    fetched = download.fetch(["w"], tmp_path, server.url, progress=False, log=lambda *_: None)
    assert fetched[0].read_bytes() == b"weights"


def test_transient_failures_are_retried_and_a_cut_transfer_resumes(server, tmp_path):
    body = bytes(range(256)) * 40
    server.files = {"model_LXRT.pth": body}
    server.unavailable["model_LXRT.pth"] = 2  # HTTP 503 twice
    server.cut["model_LXRT.pth"] = 3000  # then the connection drops after 3000 bytes
    said = []
    size = download.fetch_file([f"{server.url}/model_LXRT.pth"], tmp_path / "m.pth", {}, retries=3, retry_wait=0.01,
                               progress=False, log=said.append)
    assert size == len(body) and (tmp_path / "m.pth").read_bytes() == body
    assert [r for r in server.requests if r[1]] == [("/model_LXRT.pth", "bytes=3000-")]  # resumed, not restarted
    assert len(said) == 3 and "HTTP 503" in said[0] and "received 3000 bytes" in said[2]


def test_retries_run_out_then_the_next_source_is_tried(server, tmp_path):
    server.files = {"model_LXRT.pth": b"weights"}
    server.unavailable["model_LXRT.pth"] = 3  # the first source fails its try and both retries
    mirrors = [f"{server.url}/model_LXRT.pth", f"{server.url}/model_LXRT.pth"]
    said = []
    assert download.fetch_file(mirrors, tmp_path / "m.pth", {}, retries=2, retry_wait=0.01, progress=False,
                               log=said.append) == 7
    assert len(said) == 2  # two retries logged on the first source, then the second source answered

    server.unavailable["model_LXRT.pth"] = 10
    with pytest.raises(DownloadError, match=r"m2.pth: no source worked:\n  .*HTTP 503.*\n  .*HTTP 503"):
        download.fetch_file(mirrors, tmp_path / "m2.pth", {}, retries=1, retry_wait=0.01, progress=False,
                            log=lambda *_: None)


def test_a_missing_file_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download.fetch_file([f"{server.url}/nope"], tmp_path / "nope", {}, retries=3, retry_wait=5, progress=False,
                            log=lambda *_: None)
    assert server.requests == [("/nope", None)]


def test_mirrors_of_the_release_and_several_base_urls(server, tmp_path):
    assert download.urls_of(download.MODEL) == ["https://nlp.cs.unc.edu/data/model_LXRT.pth",
                                                "https://nlp1.cs.unc.edu/data/model_LXRT.pth"]
    assert download.urls_of(download.ALL_ANS) == [
        "https://raw.githubusercontent.com/airsplay/lxmert/master/data/lxmert/all_ans.json",
        "https://github.com/airsplay/lxmert/raw/master/data/lxmert/all_ans.json"]
    server.files = release_files("nlvr2")
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused, then the next host
    root = tmp_path / "data"
    download.fetch(["nlvr2"], root, f"{dead},{server.url}", progress=False, log=lambda *_: None, retry_wait=0.01)
    assert (root / "pretrained" / "model_LXRT.pth").read_bytes() == server.files["model_LXRT.pth"]


def test_help_shows_the_layout_a_mirror_serves(capsys):
    with pytest.raises(SystemExit):
        download.main(["--help"])
    out = capsys.readouterr().out
    assert "/lxmert_data/vqa/train.json  ->  vqa/train.json" in out
    assert "/model_LXRT.pth  ->  pretrained/model_LXRT.pth" in out
