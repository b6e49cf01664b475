"""The benchmark harness's command line: where the results file goes."""

import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_results_dir_receives_the_results_file(tmp_path):
    """``pytest benchmarks/ --benchmark-results-dir DIR`` (here in smoke mode, on the quickest suite) writes the
    results JSON and its markdown into DIR, named after the device and the day; nothing goes to benchmarks/results."""
    results = REPO / "benchmarks" / "results"
    before = set(results.iterdir())
    out = tmp_path / "my results"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_data.py", "-q", "-p", "no:cacheprovider",
         "--benchmark-results-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    written = sorted(p.name for p in out.iterdir())
    json_files = [name for name in written if name.endswith(f"-{day}.json")]
    assert len(json_files) == 1, written
    stem = json_files[0].removesuffix(".json")
    assert f"{stem}.md" in written
    doc = json.loads((out / json_files[0]).read_text())
    assert doc["mode"] == "smoke" and {r["suite"] for r in doc["records"]} == {"data"}
    assert set(results.iterdir()) == before
