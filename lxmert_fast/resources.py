"""The configs shipped with the package: model presets, DeepSpeed JSONs and training recipes.

The top-level ``configs/`` folder of a checkout is the package data ``lxmert_fast.configs`` (see
``lxmert_fast/__init__.py``; a wheel holds a copy), so a bare name such as ``lxmert_base`` or ``ds_zero2_fp16.json``
resolves the same way from a checkout, an editable install and a normal install.
"""

import importlib
import pathlib

CONFIG_PACKAGE = "lxmert_fast.configs"


def shipped_configs() -> dict[str, pathlib.Path]:
    """Every shipped config, by file name (``ds_zero2_fp16.json``)."""
    folders = importlib.import_module(CONFIG_PACKAGE).__path__  # a folder of JSON files, no __init__.py
    return {entry.name: entry for folder in folders for entry in pathlib.Path(folder).glob("*.json")}


def find_config(name_or_path) -> pathlib.Path:
    """An existing file is returned as is; a bare name (``lxmert_small``, ``ds_zero2_fp16.json``) or a path into
    ``configs/`` as the README writes it (``configs/ds_zero2_fp16.json``, from any folder) names a shipped config.
    Anything else raises FileNotFoundError listing the shipped names."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if path.parent in (pathlib.Path("."), pathlib.Path("configs")):
        file_name = path.name if path.suffix == ".json" else path.name + ".json"
        if file_name in shipped:
            return shipped[file_name]
    names = ", ".join(sorted(name.removesuffix(".json") for name in shipped))
    raise FileNotFoundError(f"config {str(name_or_path)!r}: no such file, and no shipped config of that name ({names})")
