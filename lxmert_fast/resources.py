"""The configs shipped with the package: model presets, DeepSpeed JSONs and training recipes.

The top-level ``configs/`` folder of a checkout installs as the package data ``lxmert_fast.configs``, so a bare
name such as ``lxmert_base`` or ``ds_zero2_fp16.json`` resolves the same way from a checkout, an editable install
and a normal (wheel) install.
"""

import importlib.resources
import pathlib

CONFIG_PACKAGE = "lxmert_fast.configs"


def shipped_configs() -> dict[str, pathlib.Path]:
    """Every shipped config, by file name (``ds_zero2_fp16.json``)."""
    try:
        folder = importlib.resources.files(CONFIG_PACKAGE)
    except ModuleNotFoundError as exc:  # an editable install made before the configs became package data
        raise ModuleNotFoundError(
            f"{CONFIG_PACKAGE} is not installed; reinstall the package (pip install -e . in a checkout)"
        ) from exc
    return {entry.name: pathlib.Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".json")}


def find_config(name_or_path) -> pathlib.Path:
    """An existing file is returned as is; a bare name (``lxmert_small``, ``ds_zero2_fp16.json``) names a shipped
    config. Anything else raises FileNotFoundError listing the shipped names."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if path.name == str(name_or_path):  # a bare name, not a path into some folder
        file_name = path.name if path.suffix == ".json" else path.name + ".json"
        if file_name in shipped:
            return shipped[file_name]
    names = ", ".join(sorted(name.removesuffix(".json") for name in shipped))
    raise FileNotFoundError(f"config {str(name_or_path)!r}: no such file, and no shipped config of that name ({names})")
