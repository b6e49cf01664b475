"""The project's small files: reading JSON (answer tables, answer vocabularies, model configs, annotations) so that
a broken file is reported with its path, the line and column of the fault, and what the file should hold; and the
one way every file is written atomically.

Public API
    read_json(path, what) -> object       the parsed file; `what` describes its expected content for the message,
                                          e.g. "the answer table all_ans.json: a list of {ans, dsets} objects"
    atomic_path(path)                     a context manager yielding a temporary sibling of `path` to write; renamed
                                          over `path` (after an fsync) when the block ends, deleted if it raises
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


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Write `path` through the yielded temporary sibling: readers (and a crash) see the old file or the new one,
    never half of one (os.replace is atomic on POSIX; the fsync makes the content durable before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically (UTF-8, newlines as given); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return Path(path)


def write_json(path, data, indent: int | None = 1) -> Path:
    """Write `data` as JSON to `path` atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=indent))


__all__ = ["JSONFileError", "atomic_path", "read_json", "write_json", "write_text"]
