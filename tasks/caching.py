"""Content keys for caching stage results across runs.

A key covers everything that determines a stage's output: the bytes of the data, the tokenizer
(its files), the settings, and the code that computes it. The outputs live under
``<home>/cache/<stage>/<key>/``, and a ``DONE`` marker is written last: a stage whose folder is not
complete (half-written, or deleted since) is run with ``refresh_cache`` instead of being trusted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from tasks.sources import TokenizerSource, file_digest, resolve_local

if TYPE_CHECKING:
    from tasks.config import RunConfig

DONE = "DONE"


def digest(*parts: Any) -> str:
    """A short sha256 of JSON-able parts."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:20]


def source_identity(name: str | None) -> str | None:
    """The content of a data source: file bytes, every file of a folder, or the hub id."""
    if name is None:
        return None
    path = resolve_local(name)
    if path is None:
        return f"hub:{name}"  # a hub dataset is identified by name (pin a revision to freeze it)
    if path.is_dir():
        return digest(
            [
                (str(p.relative_to(path)), file_digest(p))
                for p in sorted(path.rglob("*"))
                if p.is_file()
            ]
        )
    return file_digest(path)


def code_version(*code: ModuleType | Callable[..., Any], extra: list[Path] | None = None) -> str:
    """A hash of the source of the modules or functions (and files) that compute a cached value."""
    sources = [inspect.getsource(c) for c in code]
    sources += [p.read_text(encoding="utf-8") for p in extra or []]
    return digest(sources)


# What decides how a local model's tokenizer encodes: its own files, and config.json, from which
# transformers picks the tokenizer class.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "config.json",
    }
)


def tokenizer_identity(source: TokenizerSource) -> str:
    """What results computed with a tokenizer are keyed by.

    A local model: its folder and the bytes of its tokenizer files, read without loading the
    tokenizer (which imports torch and transformers). A hub id: the name plus a hash of the loaded
    vocabulary, the same name with another vocabulary being another tokenizer.
    """
    template = f":template-{digest(source.chat_template)}" if source.chat_template else ""
    folder = resolve_local(source.name_or_path)
    if folder is not None and folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.name in TOKENIZER_FILES and p.is_file())
        return f"{folder}:{digest([(p.name, file_digest(p)) for p in files])}{template}"
    tokenizer = source.get()
    vocab = sorted(tokenizer.get_vocab().items())
    return f"{tokenizer.name_or_path}:{digest(vocab)}{template}"


def entry(cache_root: Path, stage: str, key: str) -> Path:
    """The output folder of a stage for a content key; its name is the key Prefect caches on."""
    return cache_root / stage / key


def is_complete(folder: Path) -> bool:
    return (folder / DONE).exists()


def mark_done(folder: Path) -> None:
    (folder / DONE).write_text("ok\n")


@contextmanager
def building(folder: Path) -> Iterator[Path]:
    """A private folder to compute an entry in, published whole as ``folder`` on success.

    Runs started together on the same inputs all miss the cache and compute the same entry. Each
    writes its own staging folder and renames it into place; a complete entry is never removed
    or written into, so a run still reading it (or handed it from Prefect's cache) is never left
    with a missing file. The first complete one wins; the others discard their copy.
    """
    staging = folder.with_name(f"{folder.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        yield staging
        mark_done(staging)
        _publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def keep_failed(staging: Path, folder: Path) -> None:
    """Put a failed build's reports where the next attempt will replace them: at ``folder``, not
    marked complete (a complete entry of the same key is left alone)."""
    _publish(staging, folder)


def _publish(staging: Path, folder: Path) -> None:
    if is_complete(folder):
        return  # another run published the same content first
    if folder.exists():  # left half-written by an interrupted run (entries before staging)
        stale = folder.with_name(f"{folder.name}.stale-{uuid.uuid4().hex[:8]}")
        with suppress(FileNotFoundError):  # another run moved it first
            folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(folder)
    except OSError:
        if not is_complete(folder):  # the name was taken by something else than a finished entry
            raise


Result = TypeVar("Result", bound=BaseModel)


def rehome(result: Result, staging: Path, folder: Path) -> Result:
    """``result`` with every path into ``staging`` pointing into ``folder`` instead."""
    return type(result).model_validate_json(rehome_json(result.model_dump_json(), staging, folder))


def rehome_json(text: str, staging: Path, folder: Path) -> str:
    """JSON text with every path into ``staging`` pointing into ``folder`` instead."""
    old, new = (json.dumps(str(p))[1:-1] for p in (staging, folder))
    return text.replace(old, new)


def cache_root(cfg: RunConfig) -> Path:
    """Where content-addressed results (stage outputs, converted models) live for this home."""
    return cfg.home_dir() / "cache"
