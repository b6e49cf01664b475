"""Reading the project's small JSON files (answer tables, answer vocabularies, model configs, annotations) so that
a broken file is reported with its path, the line and column of the fault, and what the file should hold.

Public API
    JSONFileError(ValueError)             a JSON file that cannot be read or parsed
    read_json(path, what) -> object       the parsed file; `what` describes its expected content for the message,
                                          e.g. "the answer table all_ans.json: a list of {ans, dsets} objects"
"""

from __future__ import annotations

import json
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


__all__ = ["JSONFileError", "read_json"]
