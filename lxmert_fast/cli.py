"""The one way every command runs (``python -m lxmert_fast.X``, ``deepspeed lxmert_fast/pretrain.py``).

    if __name__ == "__main__":
        run(main)

An error of ours (lxmert_fast.errors) or a file the user named that cannot be opened is one line on stderr,
``prog: error: message`` as argparse writes a bad flag, and exit status 2; anything else is a bug of ours and keeps
its traceback. The distributed process group, where a run started one, is torn down at the end.
"""

import os
import sys

from lxmert_fast.errors import LxmertFastError

# a path the user gave that cannot be opened: their input, not our bug
USER_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def plural(count: int, noun: str) -> str:
    """"1 record", "2 records"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def run(main, argv=None, prog=None):
    """Call ``main(argv)`` as a command; returns its result, or exits 2 on an error of ours."""
    prog = prog or os.path.basename(sys.argv[0] or "lxmert_fast")
    already_running = _process_group_running()  # a caller's process group is the caller's to end
    try:
        return main(argv)
    except (LxmertFastError, *USER_FILE_ERRORS) as error:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        if not already_running and _process_group_running():  # the command started a run: end its process group
            sys.modules["lxmert_fast.train.distributed"].shutdown()


def _process_group_running() -> bool:
    """Whether a torch.distributed process group is up, without importing torch for a command that never did."""
    torch_distributed = sys.modules.get("torch.distributed")
    return (torch_distributed is not None and torch_distributed.is_available() and torch_distributed.is_initialized()
            and "lxmert_fast.train.distributed" in sys.modules)
