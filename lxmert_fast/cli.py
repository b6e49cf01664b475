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
    try:
        return main(argv)
    except (LxmertFastError, *USER_FILE_ERRORS) as error:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        distributed = sys.modules.get("lxmert_fast.train.distributed")  # only where the command started a run
        if distributed is not None:
            distributed.shutdown()
