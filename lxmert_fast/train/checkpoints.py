"""The checkpoint folder: ``stepNNNNNNNNN`` folders written by the engine, the ``latest`` pointer moved atomically
once every rank has written, rotation, and a failed write that keeps the last good checkpoint."""

import errno
import os
import shutil
import socket

from lxmert_fast.errors import CheckpointError
from lxmert_fast.files import write_text, written_file
from lxmert_fast.train.distributed import barrier, broadcast_from_main, gather_from_all, is_main, where_ranks

CKPT_LATEST = "latest"
# how torch.save reports a write that came up short (a full disk): a RuntimeError, not an OSError
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "inline_container.cc")


def checkpoint_tag(step):
    return f"step{step:09d}"


def latest_tag(ckpt_dir):
    """The tag ``latest`` points to, or None when there is no pointer. A pointer to a missing folder is an error:
    the checkpoints beside it may be complete, and starting afresh would rotate them away."""
    path = os.path.join(ckpt_dir, CKPT_LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not tag or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        others = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step"))
        raise CheckpointError(
            f"{path} points to {tag!r}, which is not in {ckpt_dir} (it holds {others or 'no checkpoint'}); "
            "point it at a complete checkpoint, or start afresh with --overwrite"
        )
    return tag


def save_checkpoint(engine, ckpt_dir, step, client_state, keep=2, describe=None):
    """Save the engine's checkpoint tagged ``step{N}``; ``latest`` moves to it only once every rank has finished.

    A crash (even SIGKILL) while writing leaves ``latest`` on the previous complete checkpoint; a write that fails
    (a full disk: an OSError, or torch.save's RuntimeError) removes the partial folder and raises CheckpointError
    naming it, the file and the cause. After the pointer
    has moved, checkpoints beyond ``keep`` are removed: never the new one, and the newest first kept.
    ``describe(folder)``, on rank 0, adds what the engine does not write (the model's config and tokenizer).
    """
    tag = checkpoint_tag(step)
    folder = os.path.join(ckpt_dir, tag)
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        engine.save(ckpt_dir, tag, client_state)
        if describe is not None and is_main():
            describe(folder)
    except (OSError, RuntimeError) as error:
        if not isinstance(error, OSError) and not any(m in str(error) for m in TORCH_WRITE_FAILURES):
            raise
        failed = written_file(error) or getattr(error, "filename", None) or _newest_file(folder) or folder
        shutil.rmtree(folder, ignore_errors=True)
        kept = _pointer(ckpt_dir)
        raise CheckpointError(
            f"could not write checkpoint {folder}: {_write_failure(error, failed, ckpt_dir)}; "
            + (f"the last good checkpoint {os.path.join(ckpt_dir, kept)} is kept ({CKPT_LATEST} still points to it)"
               if kept else "no checkpoint kept")
        ) from error
    barrier()  # every rank's shard is on disk before the pointer moves
    if is_main():
        write_text(os.path.join(ckpt_dir, CKPT_LATEST), tag)
        _rotate(ckpt_dir, tag, keep)
    barrier()
    return tag


def _write_failure(error, failed, ckpt_dir) -> str:
    """What went wrong, for the message: a full disk said as such, with the file and the space left now."""
    if isinstance(error, OSError) and error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return f"{error.strerror or error} writing {failed}"
    free = shutil.disk_usage(ckpt_dir).free / 2**20
    if isinstance(error, OSError):
        what = f"the disk is full writing {failed} ({error.strerror})"
    else:  # torch.save's only sign of a short write; a full disk is the usual cause
        what = (f"writing {failed} stopped part-way, most likely the disk is full (torch.save: "
                f"{str(error).splitlines()[0].strip()})")
    return f"{what}; {free:.0f} MiB free there with the partial checkpoint removed"


def _newest_file(folder):
    """The file written last under `folder` (a DeepSpeed checkpoint's files are written in place), or None."""
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return max(files, key=os.path.getmtime, default=None)


def _pointer(ckpt_dir):
    path = os.path.join(ckpt_dir, CKPT_LATEST)
    return open(path).read().strip() if os.path.isfile(path) else None


def _rotate(ckpt_dir, current, keep):
    """Keep ``current`` and the ``keep - 1`` newest checkpoints before it; tags after it (left by a killed run
    that this one resumed before) are stale and go too."""
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and os.path.isdir(os.path.join(ckpt_dir, t)))
    older = [t for t in tags if t < current]
    stale = [t for t in tags if t > current] + older[: max(len(older) - (keep - 1), 0)]
    for tag in stale:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def load_checkpoint(engine, ckpt_dir):
    """Load the latest complete checkpoint into ``engine``; returns (tag, client_state) or (None, None).

    One decision for all ranks: rank 0 reads ``latest`` and every rank loads that tag, once every rank has found
    the files it needs (a rank that cannot is named, with its host, on every rank, before anything is loaded)."""
    tag = agreed_latest_tag(ckpt_dir)
    if tag is None:
        return None, None
    folder = os.path.join(ckpt_dir, tag)
    problems = gather_from_all((socket.gethostname(), engine.checkpoint_problems(folder)))
    lacking = {}
    for r, (host, problem) in enumerate(problems):
        if problem:
            lacking.setdefault(problem, []).append((r, host))
    if lacking:
        raise CheckpointError(f"cannot resume from {folder}: " + "; ".join(
            f"{where_ranks(ranks)}: {problem}" for problem, ranks in lacking.items()))
    return tag, engine.load(ckpt_dir, tag)


def agreed_latest_tag(ckpt_dir):
    """``latest_tag`` as rank 0 reads it, on every rank (its error raised on every rank too)."""
    decision = None
    if is_main():
        try:
            decision = ("tag", latest_tag(ckpt_dir) if os.path.isdir(ckpt_dir) else None)
        except CheckpointError as error:
            decision = ("error", str(error))
    kind, value = broadcast_from_main(decision)
    if kind == "error":
        raise CheckpointError(value)
    return value
