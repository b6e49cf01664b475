"""Packaging for lxmert_fast.

The Triton kernels (top-level ``kernels/``) and the shipped configs (top-level ``configs/``) belong to the package
as ``lxmert_fast.kernels`` and ``lxmert_fast.configs``: ``package_dir`` maps those names to the top-level folders, so
an editable install and a wheel both import them under those names (no symbolic links).
``kernels/`` has no ``__init__.py`` on purpose: from the repository root, ``kernels`` would otherwise be a regular
package that shadows the PyPI package of that name (transformers probes for it); as a namespace folder it never does.
"""

from setuptools import find_packages, setup

# Triton ships wheels for Linux x86-64 and aarch64 only; elsewhere the torch backend still works.
TRITON = "triton>=3.0; platform_system == 'Linux'"

setup(
    name="lxmert_fast",
    version="0.1.0",
    description="A fast, faithful LXMERT: Triton kernels, DeepSpeed ZeRO pre-training, VQA/GQA/NLVR2 fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["lxmert_fast", "lxmert_fast.*"]), "lxmert_fast.kernels", "lxmert_fast.configs"],
    package_dir={"lxmert_fast.kernels": "kernels", "lxmert_fast.configs": "configs"},
    # The model presets, DeepSpeed JSONs and recipes ship with the package (found by lxmert_fast.resources).
    package_data={"lxmert_fast.configs": ["*.json"]},
    install_requires=[
        "torch>=2.6",
        TRITON,
        "transformers>=4.40",
        "deepspeed>=0.14",
        "numpy",
        "safetensors",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "matplotlib"],  # matplotlib: attention maps
        "xformers": ["xformers"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "extract": ["Pillow", "huggingface_hub"],  # python -m lxmert_fast.extract: image decoding, detector weights
    },
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
