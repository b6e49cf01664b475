"""Packaging: the shipped configs resolve by name from any install."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lxmert_fast.resources import find_config, shipped_configs

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "lxmert_fast", "kernels", "configs")


def test_every_file_in_configs_is_shipped():
    assert sorted(shipped_configs()) == sorted(p.name for p in (REPO / "configs").glob("*.json"))


@pytest.mark.parametrize("name", ["lxmert_small", "lxmert_base", "ds_zero2_fp16", "ds_zero2_fp16.json"])
def test_find_config_resolves_shipped_names(name):
    path = find_config(name)
    assert path.is_file() and path.name == name.removesuffix(".json") + ".json"
    json.loads(path.read_text())


def test_find_config_returns_an_existing_path_as_is(tmp_path):
    own = tmp_path / "lxmert_small.json"  # same name as a shipped preset: the user's file wins
    own.write_text("{}")
    assert find_config(own) == own
    assert find_config(str(own)) == own


@pytest.mark.parametrize("name", ["lxmert_huge", "no_such_dir/lxmert_small.json"])
def test_find_config_unknown_name_lists_the_shipped_ones(name):
    with pytest.raises(FileNotFoundError, match="no shipped config") as info:
        find_config(name)
    assert name in str(info.value) and "lxmert_base" in str(info.value) and "ds_zero2_fp16" in str(info.value)


@pytest.mark.slow
def test_non_editable_install_ships_the_configs_and_kernels(tmp_path):
    """pip install (not -e) into a folder; from outside the checkout the presets and DeepSpeed JSONs resolve to
    files inside the installed package."""
    source, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    source.mkdir()
    elsewhere.mkdir()
    for name in SOURCES:  # build from a copy, so that the build leaves nothing in the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    script = (
        "import sys; from lxmert_fast.resources import find_config\n"
        "print(find_config('lxmert_small')); print(find_config('ds_zero2_fp16'))\n"
        "import importlib.util; print(importlib.util.find_spec('lxmert_fast.kernels.ops').origin)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    installed = target / "lxmert_fast"
    assert [Path(p) for p in out] == [installed / "configs" / "lxmert_small.json",
                                      installed / "configs" / "ds_zero2_fp16.json", installed / "kernels" / "ops.py"]


@pytest.mark.slow
def test_our_kernels_folder_never_passes_for_the_pypi_kernels_package(tmp_path):
    """From the repository root, transformers probes for the PyPI package ``kernels`` (its Hub kernels). Our
    top-level ``kernels/`` is a namespace folder, so the probe neither runs it nor takes it for that package, and a
    real ``kernels`` package anywhere on the path wins over it; ``lxmert_fast.kernels`` still imports."""
    fake = tmp_path / "site" / "kernels"  # stands in for an installed PyPI `kernels`
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    script = (
        "import importlib, sys\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "available = is_kernels_available()\n"
        "ran = [m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'kernels' and m.__file__]\n"
        "from lxmert_fast.kernels.ops import add_layernorm\n"
        "print(available, ran, add_layernorm.__module__)\n"
        "sys.modules.pop('kernels', None); sys.path.append(sys.argv[1]); importlib.invalidate_caches()\n"
        "import kernels; print(kernels.__file__)\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", script, str(fake.parent)], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0] == "False [] lxmert_fast.kernels.add_layernorm"  # [] : no file of our kernels/ folder ran
    assert out[1] == str(fake / "__init__.py")
