"""Packaging: the shipped configs resolve by name from any install."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lxmert_fast.resources import find_config, shipped_configs

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "lxmert_fast", "kernels", "configs")


def test_every_file_in_configs_is_shipped():
    assert sorted(shipped_configs()) == sorted(p.name for p in (REPO / "configs").glob("*.json"))


@pytest.mark.parametrize("name", ["lxmert_small", "lxmert_base", "ds_zero2_fp16", "ds_zero2_fp16.json",
                                  "configs/recipe_lxmert_paper.json"])
def test_find_config_resolves_shipped_names(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: "configs/..." still means the shipped folder
    path = find_config(name)
    assert path.is_file() and path.name == Path(name).name.removesuffix(".json") + ".json"
    json.loads(path.read_text())


def test_find_config_returns_an_existing_path_as_is(tmp_path):
    own = tmp_path / "lxmert_small.json"  # same name as a shipped preset: the user's file wins
    own.write_text("{}")
    assert find_config(own) == own
    assert find_config(str(own)) == own


@pytest.mark.parametrize("name", ["lxmert_huge", "no_such_dir/lxmert_small.json", "configs/lxmert_huge.json"])
def test_find_config_unknown_name_lists_the_shipped_ones(name):
    with pytest.raises(FileNotFoundError, match="no shipped config") as info:
        find_config(name)
    assert name in str(info.value) and "lxmert_base" in str(info.value) and "ds_zero2_fp16" in str(info.value)


def copy_sources(source):
    """The files a build reads, copied, so that a build leaves nothing in the checkout."""
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    return source


def shipped_paths_seen_from_elsewhere(site, cwd):
    """Where the presets, a DeepSpeed JSON and the kernels resolve for a Python whose only site is ``site``
    (``-S``: not this environment's own install of lxmert_fast)."""
    script = (
        f"import site; site.addsitedir({str(site)!r})\n"
        "from lxmert_fast.resources import find_config\n"
        "print(find_config('lxmert_small')); print(find_config('ds_zero2_fp16'))\n"
        "import importlib.util; print(importlib.util.find_spec('lxmert_fast.kernels.ops').origin)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=cwd, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    return [Path(p) for p in out]


@pytest.mark.slow
def test_non_editable_install_ships_the_configs_and_kernels(tmp_path):
    """pip install (not -e) into a folder; from outside the checkout the presets and DeepSpeed JSONs resolve to
    files inside the installed package."""
    source, target, elsewhere = copy_sources(tmp_path / "src"), tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    installed = target / "lxmert_fast"
    assert shipped_paths_seen_from_elsewhere(target, elsewhere) == [
        installed / "configs" / "lxmert_small.json", installed / "configs" / "ds_zero2_fp16.json",
        installed / "kernels" / "ops.py"]


@pytest.mark.slow
def test_editable_install_imports_the_top_level_configs_and_kernels(tmp_path):
    """An editable install (pip install -e, PEP 660: the wheel setuptools builds for it, unpacked into a site
    folder): lxmert_fast.kernels and lxmert_fast.configs are the checkout's top-level folders, seen from anywhere."""
    source, wheels, target, elsewhere = (copy_sources(tmp_path / "src"), tmp_path / "wheels", tmp_path / "site",
                                         tmp_path / "elsewhere")
    for folder in (wheels, target, elsewhere):
        folder.mkdir()
    build = f"from setuptools import build_meta; print(build_meta.build_editable({str(wheels)!r}))"
    name = subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True,
                          text=True).stdout.split()[-1]
    with zipfile.ZipFile(wheels / name) as wheel:
        wheel.extractall(target)
    assert not (target / "lxmert_fast").exists()  # nothing copied: the install points at the checkout
    assert shipped_paths_seen_from_elsewhere(target, elsewhere) == [
        source / "configs" / "lxmert_small.json", source / "configs" / "ds_zero2_fp16.json",
        source / "kernels" / "ops.py"]


def test_the_repository_holds_no_symbolic_link():
    """A symbolic link is lost on checkouts without them (Windows, core.symlinks false) and hides a second path."""
    files = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert [line.split("\t")[-1] for line in files.splitlines() if line.startswith("120000")] == []


# Two worlds for the PyPI package `kernels` (transformers >= 5.25 requires it; older releases do not), made
# explicitly, so that the checks below hold whatever the resolver installed:
# - "installed": a stand-in `kernels` distribution (package + dist-info) first on the path;
# - "absent": sys.path's finder is replaced by one blind to any installed `kernels` (its modules and its metadata).
HIDE_INSTALLED_KERNELS = """
import importlib.machinery, importlib.metadata, sys
_hidden = {str(d.locate_file("")) for d in importlib.metadata.distributions(name="kernels")}

class _PathFinderWithoutKernels(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "kernels" and path is None:
            path = [entry for entry in sys.path if entry not in _hidden]
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return [d for d in super().find_distributions(*args, **kwargs)
                if (d.metadata["Name"] or "").lower() != "kernels"]

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = _PathFinderWithoutKernels
"""

PROBE_KERNELS = """
import sys
from pathlib import Path
from transformers.utils.import_utils import is_kernels_available
available = is_kernels_available()  # transformers' own probe, which may import `kernels`
import kernels  # as `import kernels` from the repository root
from lxmert_fast.kernels.ops import add_layernorm
ours = Path(sys.argv[1]).resolve()
ran = [name for name, module in sys.modules.items() if name.split(".")[0] == "kernels"
       and ours in Path(getattr(module, "__file__", None) or "/").resolve().parents]
print(available, ran, getattr(kernels, "__file__", None), add_layernorm.__module__)
print(Path(sys.modules[add_layernorm.__module__].__file__).resolve())
"""


def stand_in_kernels(site):
    """An installed PyPI `kernels` as pip lays it out: the package and its dist-info (a version transformers
    accepts: the installed one's where there is one)."""
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        version = "0.19.1"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return name\n")
    dist_info = site / f"kernels-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    return site / "kernels" / "__init__.py"


def probe_kernels_from_the_repository_root(prelude="", pythonpath=None):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run([sys.executable, "-c", prelude + PROBE_KERNELS, str(REPO / "kernels")], cwd=REPO, env=env,
                         check=True, capture_output=True, text=True).stdout.splitlines()
    available, rest = out[0].split(" ", 1)
    ran, kernels_file, ops_module = rest.rsplit(" ", 2)
    return available == "True", ran, kernels_file, ops_module, Path(out[1])


@pytest.mark.slow
@pytest.mark.parametrize("world", ["absent", "installed"])
def test_our_kernels_folder_never_passes_for_the_pypi_kernels_package(world, tmp_path):
    """From the repository root, transformers probes for the PyPI package ``kernels`` (its Hub kernels). Our
    top-level ``kernels/`` is a namespace folder: no file of it runs as ``kernels``; the probe never takes it for
    that package; a real ``kernels`` wherever it is installed wins over it; ``lxmert_fast.kernels`` imports ours."""
    if world == "installed":
        fake = stand_in_kernels(tmp_path / "site")
        available, ran, kernels_file, ops_module, ops_file = probe_kernels_from_the_repository_root(
            pythonpath=tmp_path / "site")
        assert available and kernels_file == str(fake)  # the installed package, not our folder
    else:
        available, ran, kernels_file, ops_module, ops_file = probe_kernels_from_the_repository_root(
            prelude=HIDE_INSTALLED_KERNELS)
        assert not available and kernels_file == "None"  # our folder: a namespace, never a package
    assert ran == "[]"  # no file of our kernels/ folder ran under the name `kernels`
    assert ops_module == "lxmert_fast.kernels.add_layernorm"
    assert ops_file.parent == (REPO / "kernels").resolve()
