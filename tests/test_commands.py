"""Every command answers --help without loading torch or transformers: its flags are parsed (and checked) before
the heavy imports, so a typo costs a fraction of a second, not the 15-40 s that importing them takes on a loaded
machine. Checked by the imports, not by the clock, which a loaded CI machine makes unreliable."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("pretrain", "finetune", "predict", "evaluate", "visualize", "export", "convert", "plot_metrics",
            "data.download")
HEAVY = ("torch", "transformers", "deepspeed")
# runs the command as `python -m lxmert_fast.X --help` does, then reports its exit status and the heavy imports
PROBE = """
import contextlib, io, json, runpy, sys
sys.argv = ["lxmert_fast.{command}", "--help"]
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        runpy.run_module("lxmert_fast.{command}", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": sorted(set({heavy}) & set(sys.modules)), "usage": out.getvalue()}}))
"""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_without_torch_or_transformers(command):
    code = PROBE.format(command=command, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and "usage:" in result["usage"], result
    assert result["heavy"] == [], f"python -m lxmert_fast.{command} --help imports {result['heavy']}"
