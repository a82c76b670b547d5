"""Content keys for caching stage results across runs.

A key covers everything that determines a stage's output: the bytes of the data, the tokenizer
(name and vocabulary), the settings, and the code that computes it. The outputs live under
``<home>/cache/<stage>/<key>/``, and a ``DONE`` marker is written last: a stage whose folder is not
complete (half-written, or deleted since) is run with ``refresh_cache`` instead of being trusted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from tasks.sources import file_digest, resolve_local

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


def code_version(*modules: ModuleType, extra: list[Path] | None = None) -> str:
    """A hash of the source of the modules (and files) that compute a stage."""
    sources = [inspect.getsource(m) for m in modules]
    sources += [p.read_text(encoding="utf-8") for p in extra or []]
    return digest(sources)


def tokenizer_identity(tokenizer: Any) -> str:
    """Name plus a hash of the vocabulary: the same name with another vocab is another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return f"{tokenizer.name_or_path}:{digest(vocab)}"


def entry(cache_root: Path, stage: str, key: str) -> Path:
    """The output folder of a stage for a content key; its name is the key Prefect caches on."""
    return cache_root / stage / key


def is_complete(folder: Path) -> bool:
    return (folder / DONE).exists()


def mark_done(folder: Path) -> None:
    (folder / DONE).write_text("ok\n")
