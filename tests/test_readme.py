"""The README is a path a new user pastes top to bottom in a fresh clone: its examples must run in that order.

```python blocks are complete programs and run here, in a folder laid out as after the README's fine-tuning block
(the sample data, tiny fine-tuned models where the sample runs put theirs); ```py blocks are fragments (a download
from the hub, a GPU training loop) and do not run.

```bash blocks are checked without running them (training takes minutes): every command is one this checker knows,
its flags parse with that command's own parser (a `--config` JSON's keys included), every path it reads is in a
fresh clone, made by an earlier block (the sample data, a run's output folder, a checkpoint at a step the
pre-training flags give, a download) or the user's own images; and no training run writes a folder an earlier one
wrote unless it says --resume or --overwrite. ```sh blocks are recipes for a cluster (several machines, a
scheduler, the data flags elided as `...`) and are not checked.
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from test_predict import finetune_tiny, small_sample

from lxmert_fast.data.download import NLVR2_RAW, RELEASE
from lxmert_fast.train.checkpoints import checkpoint_tag

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Sections whose commands need hardware a newcomer's one machine lacks (several GPUs, a hostfile): their flags are
# checked, their paths and output folders are not, and "..." stands for "the flags above".
NOT_RUN_IN_ORDER = {"Several GPUs and several machines"}
USER_INPUTS = {"photos/"}  # "your own images": the one input the README asks the reader to bring
HUB_NAME = re.compile(r"^(bert-base-uncased|unc-nlp/[\w.-]+)$")
FILE_SUFFIX = re.compile(r"\.(json|jsonl|tsv|pth|bin|pkl|safetensors|png|txt)$")
LAUNCHER_FLAGS = {"--num_gpus": 1, "--num_nodes": 1, "--hostfile": 1, "--master_port": 1, "--include": 1}
# flags (argparse dests) and positionals that name what a command writes; every other path-like value is read
WRITES = {"output_dir", "out", "out_dir", "submission", "metrics_out", "dir", "target", "work_dir", "results_dir"}
SAMPLE_DATA = ("sample_data/lxmert", "sample_data/sample_imgfeat", "sample_data/tokenizer")


# ------------------------------------------------------------------------------------------- the README's blocks
def sections():
    """(section title, its text) in order."""
    parts = re.split(r"^## (.+)$", README.read_text(), flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def blocks(language):
    return [(title, block) for title, body in sections()
            for block in re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)]


def commands(block):
    """Each command of a shell block as its words: continuation lines joined, comments dropped."""
    return [words for line in block.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


# ------------------------------------------------------------------------------------------ the python blocks
@pytest.fixture(scope="module")
def after_finetune(tmp_path_factory):
    """A folder as the README's fine-tuning block leaves it: sample data, fine-tuned VQA and NLVR2 models (tiny)."""
    root = tmp_path_factory.mktemp("readme")
    _, ft, store = small_sample(root)
    for task in ("vqa", "nlvr2"):
        finetune_tiny(task, ft, store, root / "output" / f"finetune_{task}" / "best_model", steps=2, batch_size=8)
    return root


def test_readme_examples_run_and_print_the_documented_results(after_finetune, monkeypatch):
    monkeypatch.chdir(after_finetune)
    python = blocks("python")
    assert len(python) >= 2, "README has lost its Python examples (the drop-in model, the Predictor)"
    for _, block in python:
        expected = [m.group(1) for m in re.finditer(r"#\s*(True|False)\s*$", block, flags=re.M)]
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(block, str(README), "exec"), {})
        assert output.getvalue().split() == expected


# ------------------------------------------------------------------------------------------- the shell blocks
class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def command_parser(module_name) -> argparse.ArgumentParser:
    """The parser a command's main() builds, taken from it at its first parse (before it does anything else). A
    script of the repository (benchmarks/x.py) is loaded from its file."""
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, REPO / module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)

    def capture(self, args=None, namespace=None):
        raise _Parsed(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            module.main([])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{module_name}.main() parsed no flags")


def parse_flags(module_name, args) -> dict:
    """The command's flag values as it would see them (a --config file's values under the command line's), or an
    AssertionError with argparse's message."""
    parser = command_parser(module_name)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            flags, unknown = parser.parse_known_args(args)
    except SystemExit:
        raise AssertionError(f"{module_name} {shlex.join(args)}: {errors.getvalue().strip()}") from None
    assert not unknown, f"{module_name} {shlex.join(args)}: unknown arguments {unknown}"
    flags = vars(flags)
    if flags.get("config"):
        loaded = json.loads((REPO / flags["config"]).read_text())
        from_file = {k.replace("-", "_"): v for k, v in loaded.items() if not k.startswith("_")}
        unknown = set(from_file) - {a.dest for a in parser._actions}
        assert not unknown, f"{flags['config']}: keys that are no flag of {module_name}: {sorted(unknown)}"
        parser.set_defaults(**from_file)
        flags = vars(parser.parse_args(args))
    return flags


def module_of(words):
    """(module, its arguments) of a `python -m`, `python script.py` or `deepspeed [launcher flags] script.py` line;
    a benchmark script (`python benchmarks/x.py`) is named by its path."""
    program, rest = words[0], words[1:]
    if program == "python" and rest[:1] == ["-m"]:
        return rest[1], rest[2:]
    if program == "python" and rest and rest[0].startswith("benchmarks/") and rest[0].endswith(".py"):
        return rest[0], rest[1:]
    if program == "deepspeed":
        while rest and rest[0] in LAUNCHER_FLAGS:
            rest = rest[1 + LAUNCHER_FLAGS[rest[0]]:]
    elif program != "python":
        raise AssertionError(f"a command this check does not know: {shlex.join(words)}")
    assert rest and rest[0].startswith("lxmert_fast/") and rest[0].endswith(".py"), shlex.join(words)
    return rest[0][: -len(".py")].replace("/", "."), rest[1:]


def tracked_paths() -> set[str]:
    """The files of a fresh clone and the folders above them."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return set(files) | {str(parent) for f in files for parent in Path(f).parents if str(parent) != "."}


@dataclass
class Folder:
    """What the blocks pasted so far have made (a path under one of them counts as made too), and which training run
    wrote which output folder (a run's folder counts as made, not all under it)."""

    tracked: set = field(default_factory=tracked_paths)
    made: set = field(default_factory=set)
    run_dirs: dict = field(default_factory=dict)

    def has(self, path) -> bool:
        path = path.rstrip("/")
        return (path in self.tracked or path in self.run_dirs
                or any(path + "/" == u or path.startswith(u) for u in USER_INPUTS)  # the folder or a file in it
                or any(path == m or path.startswith(m + "/") for m in self.made))


def path_values(flags):
    """(dest, path) for each value that names a local file or folder (hub names and presets are not paths)."""
    for dest, value in flags.items():
        if not isinstance(value, str | Path):
            continue
        for part in str(value).split(","):
            if ("/" in part or FILE_SUFFIX.search(part)) and not HUB_NAME.match(part):
                yield dest, part


def pretraining_checkpoints(out, flags):
    """The checkpoints a pre-training run keeps: every --save-every steps and the last, the newest
    --keep-checkpoints of them. Only --max-steps fixes the last step without reading the data."""
    if flags["max_steps"] is None:
        return []
    steps = list(range(flags["save_every"], flags["max_steps"], flags["save_every"])) + [flags["max_steps"]]
    return [f"{out}/checkpoints/{checkpoint_tag(s)}" for s in steps[-flags["keep_checkpoints"]:]]


def made_by(module, flags):
    """The paths a command makes: a run's output folder and models, the sample data, a download, an output file."""
    if module in ("lxmert_fast.pretrain", "lxmert_fast.finetune"):
        task = flags.get("task")
        out = flags["output_dir"] or f"output/finetune_{task}"
        pretraining = module == "lxmert_fast.pretrain"
        kept = ["final_model", "metrics.jsonl", "run_config.json"] + ["best_model"] * (not pretraining)
        made = [f"{out}/{name}" for name in kept] + pretraining_checkpoints(out, flags) * pretraining
        data_given = flags.get("train_json") or flags.get("train") or flags.get("valid") or flags.get("test_json")
        if not data_given:
            made += [*SAMPLE_DATA] + ([f"sample_data/finetune/{task}"] if task else [])
        return out, made
    if module == "lxmert_fast.data.download":
        made = [f"{flags['dir']}/{r.dest}" for part in flags["parts"] for r in RELEASE[part]]
        if "nlvr2" in flags["parts"]:
            made += [f"{flags['dir']}/nlvr2/{split}.json" for split in NLVR2_RAW]
        return None, made
    return None, [str(flags[d]) for d in WRITES if isinstance(flags.get(d), str | Path)]


def check_command(words, folder: Folder, in_order: bool):
    if words[0] == "pytest":
        return
    if words[:2] == ["pip", "install"]:
        extras = re.findall(r"\[([\w,]+)\]", " ".join(words))
        declared = re.search(r"extras_require=\{(.*?)\}", (REPO / "setup.py").read_text(), flags=re.S).group(1)
        for extra in ",".join(extras).split(",") if extras else []:
            assert f'"{extra}"' in declared, f"{shlex.join(words)}: setup.py has no extra {extra!r}"
        return
    module, args = module_of(words)
    args = [a for a in args if a != "..."] if not in_order else args
    flags = parse_flags(module, args)
    if not in_order:
        return
    out, made = made_by(module, flags)
    for path in (p for d, p in path_values(flags) if d not in WRITES):
        assert folder.has(path), (f"{shlex.join(words)} reads {path}, which neither a fresh clone nor an earlier "
                                  "block has")
    if out is not None:
        assert out not in folder.run_dirs or flags.get("resume") or flags.get("overwrite"), (
            f"{shlex.join(words)} writes {out}, which `{folder.run_dirs.get(out)}` wrote before, without --resume "
            "or --overwrite: the run would refuse the folder")
        folder.run_dirs[out] = shlex.join(words)
    folder.made.update(made)


def test_readme_shell_blocks_run_in_order_in_a_fresh_clone():
    folder = Folder()
    shell = blocks("bash")
    assert shell, "README has no shell block"
    for title, block in shell:
        for words in commands(block):
            check_command(words, folder, in_order=title not in NOT_RUN_IN_ORDER)
    assert any(p.endswith("/best_model") or "finetune_" in p for p in folder.made), "no fine-tuning run checked"


# ------------------------------------------------------------------------------------- the checker's own checks
def check(block):
    folder = Folder()
    for words in commands(block):
        check_command(words, folder, in_order=True)


@pytest.mark.parametrize("block, message", [
    ("python -m lxmert_fast.pretrain --max-steps 4\npython -m lxmert_fast.pretrain --max-steps 8", "without --resume"),
    ("python -m lxmert_fast.pretrain --max-steps 4\n"
     "python -m lxmert_fast.export output/pretrain/checkpoints/step000000200 m", "reads output/pretrain/checkpoints"),
    ("python -m lxmert_fast.finetune --task nlvr2 --load model_LXRT.pth", "reads model_LXRT.pth"),
    ("python -m lxmert_fast.finetune --task vqa --no-such-flag", "unknown arguments"),
    ("python -m lxmert_fast.finetune --task nlvr2 --config configs/recipe_finetune_nlvr2.json",
     "reads data/nlvr2/train.json"),
    ("python -m lxmert_fast.predict --model output/finetune_vqa/best_model --features x.tsv --img-id a --question q",
     "reads output/finetune_vqa/best_model"),
    ("curl -O https://example.com/x", "does not know"),
])
def test_the_checker_finds_what_a_fresh_clone_would_trip_on(block, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(block)


def test_the_checker_follows_outputs_checkpoints_and_downloads():
    check("python -m lxmert_fast.pretrain --max-steps 40 --save-every 20\n"
          "python -m lxmert_fast.export output/pretrain/checkpoints/step000000020 a\n"
          "python -m lxmert_fast.pretrain --max-steps 40 --save-every 20 --resume\n"
          "python -m lxmert_fast.data.download nlvr2 --dir data\n"
          "deepspeed --num_gpus 2 lxmert_fast/finetune.py --task nlvr2 --config configs/recipe_finetune_nlvr2.json "
          "--output-dir output/nlvr2\n"
          "python -m lxmert_fast.evaluate --model output/nlvr2/best_model "
          "--features data/nlvr2_imgfeat/valid_obj36.tsv --annotations data/nlvr2/valid.json")


def test_readme_and_docs_links_point_to_files_of_the_clone():
    """The design notes moved to docs/: every relative link of README.md and docs/*.md names a file that is there."""
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"^[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}, which is missing"
