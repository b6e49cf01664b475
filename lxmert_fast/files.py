"""The project's small files: reading JSON (answer tables, answer vocabularies, model configs, annotations) so that
a broken file is reported with its path, the line and column of the fault, and what the file should hold; and the
one way every file is written atomically.

Public API
    read_json(path, what) -> object       the parsed file; `what` describes its expected content for the message,
                                          e.g. "the answer table all_ans.json: a list of {ans, dsets} objects"
    atomic_path(path)                     a context manager yielding a temporary sibling of `path` to write; renamed
                                          over `path` (after an fsync) when the block ends, deleted if it raises;
                                          the file gets the permissions open() gives (0666 less the umask), and an
                                          error raised in the block a note naming `path` (written_file(error))
    publish_files(folder)                 give every file of a folder written by another library (save_pretrained)
                                          the permissions open() gives
    write_text(path, text) -> Path        a text file, atomically
    write_json(path, data, indent=1)      a JSON file, atomically
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from lxmert_fast.errors import JSONFileError


def read_json(path, what: str):
    """Parse the JSON file at `path`. A missing file raises FileNotFoundError, a file that is not UTF-8 JSON a
    JSONFileError naming the file, line and column (``path:line:column:``) and saying what the file should be
    (`what`)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: cannot read {what} (no such file)") from None
    except IsADirectoryError:
        raise JSONFileError(f"{path} is a folder; expected a JSON file: {what}") from None
    except json.JSONDecodeError as err:
        raise JSONFileError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); expected {what}") from None
    except UnicodeDecodeError as err:
        raise JSONFileError(f"{path}: byte {err.start} is not UTF-8 text; expected {what}") from None


_WRITING = "while writing "


def current_umask() -> int:
    """The process's umask, read without changing it where /proc tells (os.umask alone must set one to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _honour_umask(path: Path) -> None:
    """Give a file the permissions a plain open() would (0666 less the umask): some writers (safetensors) create
    theirs 0600, which would make a converted or exported model unreadable by the group."""
    if path.is_file():
        os.chmod(path, 0o666 & ~current_umask())


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Write `path` through the yielded temporary sibling: readers (and a crash) see the old file or the new one,
    never half of one (os.replace is atomic on POSIX; the fsync makes the content durable before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _honour_umask(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        error.add_note(f"{_WRITING}{path}")  # which file failed, for a caller that writes several (a checkpoint)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def written_file(error: BaseException) -> str | None:
    """The file atomic_path was writing when `error` was raised, or None when it was not raised there."""
    notes = [n for n in getattr(error, "__notes__", ()) if n.startswith(_WRITING)]
    return notes[-1][len(_WRITING):] if notes else None


def write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8, newlines as given); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return Path(path)


def write_json(path, data, indent: int | None = 1) -> Path:
    """Write `data` as JSON to `path` atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=indent))


def publish_files(folder) -> Path:
    """Give every file under `folder` the permissions open() gives (a model folder written by save_pretrained:
    safetensors writes its files 0600); returns the folder."""
    folder = Path(folder)
    for path in folder.rglob("*"):
        _honour_umask(path)
    return folder


__all__ = ["JSONFileError", "atomic_path", "current_umask", "publish_files", "read_json", "write_json", "write_text",
           "written_file"]
