"""Loading the word-piece tokenizer, and checking that what loaded is a real vocabulary.

transformers does not always fail when a tokenizer is missing: an empty folder, or a hub name on a machine without
internet, gives a tokenizer of the five special tokens that turns every word into [UNK], and training on it runs
to the end. So every tokenizer is checked once, when a data set loads it, against a few sentences of the data.

Public API
    TokenizerError(ValueError)     a tokenizer that is missing or did not really load; says what and from where
    load_tokenizer(tokenizer) -> tokenizer
        a tokenizer object as is; a folder (with vocab.txt or tokenizer.json) or a hub name (cached, or downloaded
        when online) through BertTokenizerFast. A path that does not exist is named as a missing folder.
    tokenize_serially_in_forked_children()   forked processes (DataLoader workers) tokenize serially (a fork hazard)
    check_tokenizer(tokenizer, texts, vocab_size=None)
        [CLS] [SEP] [PAD] [MASK] [UNK] in the vocabulary, at most vocab_size tokens (the model's), and the first
        sentences of `texts` not mostly [UNK]
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from lxmert_fast.errors import TokenizerError
from lxmert_fast.model.folder import TOKENIZER_FILES

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")
GET_BERT_BASE = (
    "python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('bert-base-uncased')"
    ".save_pretrained('tokenizers/bert-base-uncased')\" (once, online), then pass "
    "--tokenizer tokenizers/bert-base-uncased"
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


def _offline() -> bool:
    from huggingface_hub import constants  # its flag is what transformers follows (read when the hub is imported)

    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(flag in ("1", "ON", "YES", "TRUE") for flag in flags)


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, f), str) for f in TOKENIZER_FILES)


def tokenize_serially_in_forked_children() -> None:
    """Make a process forked from this one (a DataLoader worker) tokenize serially. The Rust tokenizer's thread pool
    does not survive a fork; tokenizers' own guard turns parallelism off in the child only while
    TOKENIZERS_PARALLELISM is unset, so with it set to true a worker's first batch waited on the lost pool forever.
    Registered once per process; this process keeps its setting."""
    global _FORK_HOOK_REGISTERED
    if not _FORK_HOOK_REGISTERED:
        os.register_at_fork(after_in_child=_tokenize_serially)
        _FORK_HOOK_REGISTERED = True


_FORK_HOOK_REGISTERED = False


def _tokenize_serially() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the tokenizer at each call


def load_tokenizer(tokenizer):
    """A tokenizer object as is, or BertTokenizerFast from a folder or hub name (see the module docstring); either
    way forked children of this process tokenize serially (tokenize_serially_in_forked_children)."""
    tokenize_serially_in_forked_children()
    if not isinstance(tokenizer, str | Path):
        return tokenizer
    from transformers import BertTokenizerFast

    name = str(tokenizer)
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise TokenizerError(
                f"tokenizer folder {path} holds no tokenizer (neither {' nor '.join(TOKENIZER_FILES)}); save one there "
                "with tokenizer.save_pretrained(folder)"
            )
        name = str(path)
    elif path.exists():
        raise TokenizerError(f"tokenizer {path} is a file; expected a tokenizer folder (vocab.txt or tokenizer.json)")
    elif not _HUB_NAME.match(name) or ".." in name or "--" in name:
        raise TokenizerError(f"tokenizer folder {path} does not exist")
    elif _offline() and not _in_hub_cache(name):
        how = GET_BERT_BASE if name == "bert-base-uncased" else "save_pretrained() to a folder once, online"
        raise TokenizerError(
            f"tokenizer {name!r}: there is no folder {path}, and as a hub name it is not in the Hugging Face cache "
            f"while HF_HUB_OFFLINE is set. Get it with {how}"
        )
    try:
        return BertTokenizerFast.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"tokenizer from {_source(name)} did not load: {err}") from None


def _source(name: str) -> str:
    if not name:
        return "an object"
    return f"folder {name}" if Path(name).is_dir() else f"hub name {name!r} (no folder of that name exists)"


def check_tokenizer(tokenizer, texts: Sequence[str], vocab_size: int | None = None, samples: int = 64) -> None:
    """Raise a TokenizerError saying what was loaded and from where when `tokenizer` lacks a special token, has more
    tokens than `vocab_size` (the model's embedding rows), or turns at least half of the word pieces of the first
    `samples` sentences of `texts` into [UNK]."""
    source = _source(str(getattr(tokenizer, "name_or_path", "")))
    what = f"the tokenizer from {source} ({type(tokenizer).__name__}, {len(tokenizer)} tokens)"
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"{what} lacks the special tokens {', '.join(missing)} that BERT / LXMERT inputs need")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise TokenizerError(
            f"{what} has more tokens than the model's vocab_size={vocab_size}: use the tokenizer the model was "
            "pre-trained with"
        )
    sentences = [t for t in texts[:samples] if t.strip()]
    if not sentences:
        return
    pieces = [p for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"] for p in ids]
    unknown = sum(p == vocab["[UNK]"] for p in pieces)
    if pieces and 2 * unknown >= len(pieces):
        example = sentences[0]
        shown = " ".join(tokenizer.convert_ids_to_tokens(tokenizer(example, add_special_tokens=False)["input_ids"]))
        hint = f" (the usual one: {GET_BERT_BASE})" if len(tokenizer) <= len(SPECIAL_TOKENS) else ""
        raise TokenizerError(
            f"{what} does not know the data's words: {unknown} of {len(pieces)} word pieces of the first "
            f"{len(sentences)} sentences are [UNK], e.g. {example[:60]!r} -> {shown[:120]!r}. Pass the folder of a "
            f"real vocabulary with --tokenizer{hint}"
        )


__all__ = ["SPECIAL_TOKENS", "TokenizerError", "check_tokenizer", "load_tokenizer"]
