"""The README's Python examples run and print what the README says they print.

```python blocks are complete programs and run here; ```py blocks are fragments (a GPU training loop, say) and do not.
"""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run_and_print_the_documented_results():
    blocks = python_blocks()
    assert blocks, "README has no Python example"
    for block in blocks:
        expected = [m.group(1) for m in re.finditer(r"#\s*(True|False)\s*$", block, flags=re.M)]
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(block, str(README), "exec"), {})
        assert output.getvalue().split() == expected
