"""Crash-safe publishing of generated directories (feature stores, sample data).

A directory is built under a temporary sibling name, every file is fsync'ed, and only then is it renamed to its
final name, so a reader that finds the final name finds complete content; a process killed half-way leaves only a
`*.tmp-*` sibling, which nothing trusts and the next builder deletes. An exclusive `fcntl` lock on a `*.lock`
sibling makes concurrent builders (several ranks started at once) wait for one another instead of racing.

    with build_lock(final):                 # serialise builders of `final`
        if not is_valid(final):
            with staging_dir(final) as tmp:  # deleted again if the body raises
                ...write files into tmp...
                publish_dir(tmp, final)      # fsync + atomic rename
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync one file or directory (directories: so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock that serialises every builder of `final` (across processes)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def remove_stale_staging(final: Path) -> None:
    """Delete `*.tmp-*` / `*.old-*` leftovers of builders of `final` that died; call it holding `build_lock`."""
    for leftover in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in final.parent.glob(f"{final.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `final`; removed on exit unless it was published (renamed away)."""
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync every file under `tmp`, then rename it to `final`, replacing an older `final` if there is one."""
    for root, _dirs, files in os.walk(tmp):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    old = None
    if final.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first. Between the two renames
        # `final` is missing, which readers treat as "not built yet", never as a half-written store.
        old = final.parent / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
