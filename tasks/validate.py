"""The data contract: a Great Expectations suite run on every raw table before anything is trained.

The suites are reviewable JSON files in ``data/expectations/`` (one per task type). Column names are
filled in from the config; thresholds and the label set are GE suite parameters. A few columns are
derived first (token counts, duplicate and leakage flags, class counts) so that every rule, the
table-level ones included, is an ordinary GE expectation with GE's own counts and examples.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tasks.config import DEFAULT_MAX_TRUNCATED, DataConfig
from tasks.results import ValidatedData
from tasks.sources import (
    SourceError,
    Table,
    combined_fingerprint,
    fingerprint,
    read_table,
    separator_hint,
)

if TYPE_CHECKING:
    from tasks.kinds import Kind

log = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).resolve().parent.parent / "data" / "expectations"
EXAMPLES_SHOWN = 3
DERIVED = (
    "_not_string",
    "_n_tokens",
    "_duplicate",
    "_in_train",
    "_label_count",
    "_imbalance_ratio",
)
# The report keeps at most this much of any value and this many entries of any list: a 5 MB row
# must not become a 15 MB report.
REPORT_CHARS = 300
# Derived flags about a row's text: a failure is reported on the text column, with the texts.
TEXT_FLAGS = ("_not_string", "_duplicate", "_in_train")
REPORT_ITEMS = 20


class DataValidationError(ValueError):
    """The data broke its contract. ``str()`` is a report a person can act on."""

    def __init__(self, failures: list[dict[str, Any]], report_path: Path | None = None):
        self.failures = failures
        self.report_path = report_path
        super().__init__(render_failures(failures, report_path))


def suite_path(task: str) -> Path:
    """The suite file of a task type."""
    return SUITES_DIR / f"{task}.json"


def load_suite(task: str, text_column: str, label_column: str) -> Any:
    """The GE ``ExpectationSuite`` for a task type, with the configured column names filled in."""
    import great_expectations as gx

    text = suite_path(task).read_text(encoding="utf-8")
    for key, name in {"text_column": text_column, "label_column": label_column}.items():
        # Column names go into JSON strings: escape them as JSON would.
        text = text.replace("{{" + key + "}}", json.dumps(name)[1:-1])
    spec = json.loads(text)
    return gx.ExpectationSuite(
        name=spec["name"], expectations=spec["expectations"], meta=spec["meta"]
    )


def infer_labels(values: pd.Series) -> list[str]:
    """The sorted label set of a column (numerically when every label is a number)."""
    present = sorted({v for v in values.dropna() if v != ""})
    try:
        return sorted(present, key=float)
    except ValueError:
        return present


def labels_as_strings(values: pd.Series) -> pd.Series:
    """Labels compared as strings; ``1.0`` read from a float column is the label ``1``."""

    def convert(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return pd.Series([convert(v) for v in values], index=values.index, dtype=object)


def derive_columns(
    frame: pd.DataFrame,
    cfg: DataConfig,
    train_texts: set[str] | None,
    tokenizer: Any | None,
) -> pd.DataFrame:
    """The raw table plus the ``_``-prefixed columns the suite checks.

    Args:
        train_texts: texts of the training table, when ``frame`` is a validation or test table.
        tokenizer: counts tokens per text; without it every text counts as untruncated.
    """
    out = frame.copy()
    # A kind may say which text duplicates and leakage are judged on (an SFT row's prompt).
    key = "_key_text" if "_key_text" in out else cfg.text_column
    has_text = key in out
    if has_text:
        # A number, list or object where text belongs is flagged, then checked as its JSON text
        # (a dict cannot even be compared for duplicates).
        out["_not_string"] = [not _is_missing(v) and not isinstance(v, str) for v in out[key]]
        out[key] = pd.Series(
            [v if _is_missing(v) or isinstance(v, str) else _as_text(v) for v in out[key]],
            index=out.index,
            dtype=object,
        )
    else:
        out["_not_string"] = False
    texts = out[key] if has_text else pd.Series([None] * len(out), index=out.index)
    strings = [t if isinstance(t, str) else "" for t in texts]
    if "_n_tokens" in out:
        pass  # counted by the kind (an SFT row: its rendered conversation)
    elif tokenizer is not None and has_text and strings:
        # Count without truncating: the contract reports how much truncation will cut.
        out["_n_tokens"] = [len(ids) for ids in tokenizer(strings, truncation=False)["input_ids"]]
    else:
        out["_n_tokens"] = 0
    out["_duplicate"] = texts.duplicated(keep="first") & texts.notna() if has_text else False
    out["_in_train"] = texts.isin(train_texts) if has_text and train_texts else False
    if cfg.label_column in out:
        counts = out[cfg.label_column].value_counts()
        out["_label_count"] = out[cfg.label_column].map(counts).fillna(0).astype(int)
        out["_imbalance_ratio"] = float(counts.max() / counts.min()) if len(counts) else 1.0
    else:
        out["_label_count"] = 0
        out["_imbalance_ratio"] = 1.0
    return out


def _as_plain(value: Any) -> Any:
    """A numpy value as the Python value it holds (1000, not np.int64(1000); a list, not an
    array: a Parquet list column)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_text(value: Any) -> str:
    if hasattr(value, "tolist"):  # numpy arrays and scalars (parquet lists)
        value = value.tolist()
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


def suite_parameters(cfg: DataConfig, labels: list[str], max_length: int, is_train: bool) -> dict:
    """The suite's ``$PARAMETER`` values. Class-balance rules bind the training table only."""
    return {
        "labels": labels,
        "min_chars": cfg.min_chars,
        "max_chars": cfg.max_chars,
        "max_length": max_length,
        "max_length_mostly": 1
        - (
            cfg.max_truncated_fraction
            if cfg.max_truncated_fraction is not None
            else DEFAULT_MAX_TRUNCATED
        ),
        "encoding_mostly": 1 - cfg.max_encoding_problem_rate,
        "duplicate_mostly": 1 - cfg.max_duplicate_rate,
        "required_labels": labels if is_train else [],
        "min_classes": 2 if is_train else 1,
        "min_rows_per_class": cfg.min_rows_per_class if is_train else 1,
        "max_imbalance_ratio": cfg.max_imbalance_ratio if is_train else None,
    }


def run_suite(
    frame: pd.DataFrame, name: str, suite: Any, parameters: dict[str, Any], complete: bool = False
) -> dict[str, Any]:
    """Validate one table with GE and return the JSON-able validation result.

    ``complete`` asks GE for every offending row index (needed to quarantine rows), not a sample.
    """
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}  # type: ignore[assignment]
    asset = context.data_sources.add_pandas("fulltune").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": frame}
    )
    result = batch.validate(
        suite,
        result_format={
            "result_format": "COMPLETE" if complete else "SUMMARY",
            "partial_unexpected_count": EXAMPLES_SHOWN,
        },
        expectation_parameters=parameters,
    )
    return result.to_json_dict()


def summarize_failures(
    result: dict[str, Any],
    origin: str,
    frame: pd.DataFrame,
    text_column: str,
    labels: list[str],
) -> list[dict[str, Any]]:
    """One row per failed expectation: which file, column, rule, how many rows, examples.

    The cause is reported once: a missing column fails its "required column" rule and not every
    rule that reads it, and an empty table fails "at least one row" and not the rules about its
    classes. A derived flag (a duplicate, a text seen in train) is shown by its row's text.
    """
    columns = [c for c in frame.columns if not str(c).startswith("_")]
    missing = {
        item["expectation_config"]["kwargs"]["column"]
        for item in result["results"]
        if item["expectation_config"]["type"] == "expect_column_to_exist" and not item["success"]
    }
    empty = len(frame) == 0
    failures = []
    for item in result["results"]:
        if item["success"]:
            continue
        config = item["expectation_config"]
        outcome = item.get("result") or {}
        column = config["kwargs"].get("column")
        derived = column is not None and column.startswith("_")
        exists_rule = config["type"] == "expect_column_to_exist"
        if not exists_rule and (column in missing or ((derived or empty) and missing)):
            continue  # a knock-on failure of a missing column
        if empty and config["type"] != "expect_table_row_count_to_be_between" and not exists_rule:
            continue  # no rows: the row count is the cause
        raised = (item.get("exception_info") or {}).get("raised_exception")
        if raised and derived:
            continue
        indices = outcome.get("partial_unexpected_index_list") or outcome.get(
            "unexpected_index_list", []
        )
        values = outcome.get("partial_unexpected_list") or outcome.get("unexpected_list", [])
        shown_column = column
        if column in TEXT_FLAGS and text_column in frame:
            values = [frame[text_column].get(i) for i in indices]  # the text, not `True`
            shown_column = text_column
        failures.append(
            {
                "source": origin,
                "column": shown_column,
                "rule": (config.get("meta") or {}).get("rule", config["type"]),
                "expectation": config["type"],
                "unexpected_count": outcome.get("unexpected_count"),
                "element_count": outcome.get("element_count"),
                "examples": [
                    {"row": i, "value": _clip(_as_plain(v), REPORT_CHARS)}
                    for i, v in list(zip(indices, values, strict=False))[:EXAMPLES_SHOWN]
                ],
                "observed": _observed(config, outcome, columns, column in missing, labels),
            }
        )
    return failures


def _observed(
    config: dict[str, Any],
    outcome: dict[str, Any],
    columns: list[str],
    missing: bool,
    labels: list[str],
) -> Any:
    """What the data showed for a failed rule, in words that point at the fix."""
    observed = outcome.get("observed_value")
    kind = config["type"]
    if missing:
        return f"columns found: {columns}{separator_hint(columns)}"
    if kind == "expect_table_row_count_to_be_between":
        return f"{observed} rows"
    if "partial_missing_list" in outcome:
        return f"missing: {outcome['partial_missing_list']} (declared: {labels})"
    return observed


def explain_label_mismatch(
    failures: list[dict[str, Any]], frame: pd.DataFrame, cfg: DataConfig, labels: list[str]
) -> None:
    """When no row has a declared label, say so plainly: the two label sets and the fix."""
    for f in failures:
        if (
            f["expectation"] == "expect_column_values_to_be_in_set"
            and f["column"] == cfg.label_column
            and f["unexpected_count"]
            and f["unexpected_count"] == f["element_count"]
            and cfg.labels
        ):
            found = infer_labels(frame[cfg.label_column])
            shown = found if len(found) <= 20 else [*found[:20], "..."]
            f["observed"] = (
                f"no row has a declared label: the config declares {labels}, the data has "
                f"{shown}; `--set data.labels=null` infers the label set from the data"
            )


def explain_leakage(failures: list[dict[str, Any]], split: str, train_origin: str) -> None:
    """Name both tables of a leakage failure."""
    for f in failures:
        if "leakage" in f["rule"]:
            f["observed"] = (
                f"{f['unexpected_count']} {split} text(s) also occur in the train table "
                f"({train_origin})"
            )


def render_failures(failures: list[dict[str, Any]], report_path: Path | None = None) -> str:
    """A plain-text report of failed expectations, one paragraph each."""
    lines = [f"data validation failed: {len(failures)} expectation(s) not met"]
    for f in failures:
        where = f"{f['source']}" + (f", column {f['column']!r}" if f["column"] else "")
        lines.append(f"- {where}: {f['rule']} [{f['expectation']}]")
        if f["unexpected_count"] is not None:
            share = f["unexpected_count"] / max(f["element_count"] or 1, 1)
            lines.append(
                f"    {f['unexpected_count']} of {f['element_count']} rows fail ({share:.1%})"
            )
        for ex in f["examples"]:
            lines.append(
                f"    e.g. row {ex['row']} (0-based, header excluded): {_clip(ex['value'])!r}"
            )
        if f["observed"] is not None:
            lines.append(f"    observed: {_clip(f['observed'], 200)}")
    if report_path is not None:
        lines.append(f"full Great Expectations result: {report_path}")
    return "\n".join(lines)


def render_markdown(failures: list[dict[str, Any]]) -> str:
    """The failed expectations as a Markdown table (for the Prefect artifact)."""
    rows = ["| source | column | rule | failing rows | examples |", "|---|---|---|---|---|"]
    for f in failures:
        count = (
            ""
            if f["unexpected_count"] is None
            else f"{f['unexpected_count']} / {f['element_count']}"
        )
        examples = "; ".join(f"row {e['row']}: `{_clip(e['value'], 40)!r}`" for e in f["examples"])
        examples = examples or _clip(f["observed"] or "", 80)
        cells = [Path(f["source"]).name, f["column"] or "", f["rule"], count, examples]
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def render_html(results: dict[str, dict[str, Any]], dropped: dict[str, int]) -> str:
    """A self-contained HTML page listing every expectation of every table with its outcome."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>fulltune data validation</title>",
        "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        ".ok{color:#1a7f37}.bad{color:#cf222e;font-weight:bold}</style>",
        "<h1>Data validation</h1>",
    ]
    if dropped:
        parts.append(
            "<h2>Rows quarantined (on_invalid: drop)</h2><table><tr><th>rule</th><th>rows</th></tr>"
        )
        parts += [f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in dropped.items()]
        parts.append("</table>")
    for split, result in results.items():
        stats = result["statistics"]
        parts.append(
            f"<h2>{html.escape(split)}: {stats['successful_expectations']} of "
            f"{stats['evaluated_expectations']} expectations met</h2>"
            "<table><tr><th>status</th><th>rule</th><th>expectation</th><th>column</th>"
            "<th>failing rows</th><th>examples</th></tr>"
        )
        for item in result["results"]:
            config, outcome = item["expectation_config"], item.get("result") or {}
            count = outcome.get("unexpected_count")
            examples = outcome.get("partial_unexpected_list") or []
            cells = [
                "<span class='ok'>pass</span>"
                if item["success"]
                else "<span class='bad'>FAIL</span>",
                html.escape(str((config.get("meta") or {}).get("rule", ""))),
                config["type"],
                html.escape(str(config["kwargs"].get("column", ""))),
                "" if count is None else f"{count} of {outcome.get('element_count')}",
                html.escape(", ".join(repr(_clip(e, 60)) for e in examples[:EXAMPLES_SHOWN])),
            ]
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def _clip(value: Any, limit: int = 80) -> Any:
    if not isinstance(value, str):
        return value
    return value if len(value) <= limit else value[: limit - 1] + "…"


def offending_rows(result: dict[str, Any]) -> dict[str, list[int]]:
    """Row indices to quarantine, by rule: every row-level rule marked droppable in the suite.

    Rows are taken whether or not the rule's ``mostly`` tolerance was met: in drop mode the
    tolerance is for the data that stays, and a known-bad row has no reason to stay.
    """
    rows: dict[str, list[int]] = {}
    for item in result["results"]:
        meta = item["expectation_config"].get("meta") or {}
        indices = (item.get("result") or {}).get("unexpected_index_list") or []
        if meta.get("drop") and indices:
            rows.setdefault(meta["rule"], []).extend(int(i) for i in indices)
    return rows


def read_sources(cfg: DataConfig) -> dict[str, Table]:
    """The configured train (and validation, test) sources, each read into one table."""
    if cfg.train is None:
        raise SourceError("data.train: no training data given")
    sources = {"train": (cfg.train, cfg.train_split)}
    if cfg.validation:
        sources["validation"] = (cfg.validation, cfg.validation_split)
    if cfg.test:
        sources["test"] = (cfg.test, cfg.test_split)
    return {
        split: read_table(name, hub_split, cfg.text_documents)
        for split, (name, hub_split) in sources.items()
    }


def check_tables(
    frames: dict[str, pd.DataFrame],
    cfg: DataConfig,
    suite: Any,
    labels: list[str],
    tokenizer: Any | None,
    max_length: int,
    complete: bool,
    token_lengths: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """The GE result of every table; held-out tables are also checked for leakage from train.

    ``token_lengths``, when given, receives each table's token count per row (counted once, here,
    for the truncation rule; the schedule's sizing reads them back).
    """
    train = frames["train"]
    key = "_key_text" if "_key_text" in train else cfg.text_column
    train_texts = (
        {t if isinstance(t, str) else _as_text(t) for t in train[key] if not _is_missing(t)}
        if key in train
        else None
    )
    results = {}
    for split, frame in frames.items():
        derived = derive_columns(frame, cfg, None if split == "train" else train_texts, tokenizer)
        if token_lengths is not None:
            token_lengths[split] = derived["_n_tokens"].to_numpy(dtype=np.int64)
        params = suite_parameters(cfg, labels, max_length, split == "train")
        results[split] = run_suite(derived, split, suite, params, complete)
    return results


def quarantine(
    frames: dict[str, pd.DataFrame], results: dict[str, dict[str, Any]], workdir: Path
) -> tuple[dict[str, pd.DataFrame], dict[str, int], str | None]:
    """Remove rows that break a droppable rule: (kept tables, rows per rule, quarantine file).

    Each removed row is written once to ``quarantine.csv``, under the first rule it broke.
    """
    kept, quarantined = dict(frames), []
    dropped: dict[str, int] = {}
    for split, frame in frames.items():
        first_rule: dict[int, str] = {}
        for rule, indices in offending_rows(results[split]).items():
            for i in indices:
                first_rule.setdefault(i, rule)
        if not first_rule:
            continue
        rows = sorted(first_rule)
        bad = frame.loc[rows].assign(_split=split, _rule=[first_rule[i] for i in rows])
        quarantined.append(bad)
        for rule in bad["_rule"]:
            dropped[rule] = dropped.get(rule, 0) + 1
        kept[split] = frame.drop(index=rows).reset_index(drop=True)
    if not quarantined:
        return kept, dropped, None
    path = workdir / "quarantine.csv"
    pd.concat(quarantined).to_csv(path, index_label="_row")
    log.warning("quarantined rows by rule: %s (see %s)", dropped, path)
    return kept, dropped, str(path)


def label_form(label: str) -> str:
    """What two spellings of one label share: case and surrounding spaces set aside."""
    return " ".join(label.split()).casefold()


def near_duplicate_labels(
    frame: pd.DataFrame, origin: str, cfg: DataConfig
) -> list[dict[str, Any]]:
    """Labels that differ only by case or spaces ("Positive", "positive "): one class, trained as
    several. Refused, naming each group and a row of every spelling."""
    column = frame[cfg.label_column]
    groups: dict[str, list[str]] = {}
    for label in sorted({v for v in column.dropna() if isinstance(v, str)}):
        groups.setdefault(label_form(label), []).append(label)
    clashes = {form: spellings for form, spellings in groups.items() if len(spellings) > 1}
    if not clashes:
        return []
    examples = []
    for spellings in clashes.values():
        for spelling in spellings:
            row = int(column.index[column == spelling][0])
            examples.append({"row": row, "value": spelling})
    shown = "; ".join(" / ".join(repr(s) for s in spellings) for spellings in clashes.values())
    return [
        {
            "source": origin,
            "column": cfg.label_column,
            "rule": "labels differ by more than case or surrounding spaces",
            "expectation": "distinct label spellings",
            "unexpected_count": int(column.isin([s for g in clashes.values() for s in g]).sum()),
            "element_count": len(column),
            "examples": examples[:EXAMPLES_SHOWN],
            "observed": f"one label spelled several ways: {shown}; make each label one spelling "
            "in the data (or list the classes in data.labels once each)",
        }
    ]


def emptied_by_drop(
    origin: str, split: str, dropped: dict[str, int], workdir: Path
) -> dict[str, Any]:
    """The failure of a table that ``on_invalid: drop`` quarantined completely."""
    return {
        "source": origin,
        "column": None,
        "rule": f"no rows left in the {split} table after on_invalid: drop",
        "expectation": "quarantine",
        "unexpected_count": None,
        "element_count": None,
        "examples": [],
        "observed": f"rows quarantined by rule: {dropped} (see {workdir / 'quarantine.csv'})",
    }


def capped(value: Any) -> Any:
    """A JSON-able tree with long strings clipped and long lists cut (for the stored report)."""
    if isinstance(value, str):
        return _clip(value, REPORT_CHARS)
    if isinstance(value, dict):
        return {k: capped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [capped(v) for v in value[:REPORT_ITEMS]]
        return (
            [*items, f"... {len(value) - REPORT_ITEMS} more"]
            if len(value) > REPORT_ITEMS
            else items
        )
    return value


def truncated_fractions(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per table, the share of texts over ``max_length`` tokens, as the token rule measured it."""
    truncated = {}
    for split, result in results.items():
        for item in result["results"]:
            if item["expectation_config"]["kwargs"].get("column") == "_n_tokens":
                truncated[split] = (item["result"].get("unexpected_percent") or 0.0) / 100
    return truncated


def validate_data(
    cfg: DataConfig,
    workdir: Path,
    kind: Kind,
    tokenizer: Any | None,
    max_length: int,
) -> ValidatedData:
    """Read every configured source, validate each with the task's GE suite, write clean tables.

    The label set is ``cfg.labels`` when declared, else inferred from the training table and then
    frozen: validation and test labels must fall inside it. With ``cfg.on_invalid == "drop"``,
    rows breaking a row-level rule go to ``quarantine.csv`` and the rest is validated again.

    Args:
        kind: the task's kind: its suite, whether rows are labelled, the columns it derives from
            a raw row (an SFT conversation) and the clean table it keeps.
        tokenizer: counts tokens for the truncation rule (None: every text counts as fitting).
        max_length: the model's token budget per example.

    Raises:
        SourceError: a source cannot be read.
        DataValidationError: an expectation fails on any table; nothing is written for training.
    """
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    tables = read_sources(cfg)
    frames = {
        split: table.frame.join(kind.derive(table.frame, cfg, tokenizer))
        for split, table in tables.items()
    }
    suite = load_suite(kind.task, cfg.text_column, cfg.label_column)
    has_labels = kind.has_labels
    labels: list[str] = []
    if has_labels:
        for frame in frames.values():
            if cfg.label_column in frame.columns:
                frame[cfg.label_column] = labels_as_strings(frame[cfg.label_column])
        if cfg.label_column in frames["train"]:
            labels = cfg.labels or infer_labels(frames["train"][cfg.label_column])
    elif cfg.labels:
        labels = list(cfg.labels)  # a declared answer set (sft): what the answers are judged on

    drop = cfg.on_invalid == "drop"
    lengths: dict[str, np.ndarray] = {}
    results = check_tables(
        frames, cfg, suite, labels, tokenizer, max_length, complete=drop, token_lengths=lengths
    )
    dropped: dict[str, int] = {}
    quarantine_path = None
    if drop:
        frames, dropped, quarantine_path = quarantine(frames, results, workdir)
        results = check_tables(
            frames, cfg, suite, labels, tokenizer, max_length, complete=False, token_lengths=lengths
        )

    failures = []
    key = "_key_text" if "_key_text" in frames["train"] else cfg.text_column
    for split, result in results.items():
        found = summarize_failures(result, tables[split].origin, frames[split], key, labels)
        if has_labels:
            explain_label_mismatch(found, frames[split], cfg, labels)
        explain_leakage(found, split, tables["train"].origin)
        failures += found
    if has_labels and cfg.label_column in frames["train"]:
        failures += near_duplicate_labels(frames["train"], tables["train"].origin, cfg)
    for split, frame in frames.items():
        if drop and frame.empty and dropped:
            failures.insert(0, emptied_by_drop(tables[split].origin, split, dropped, workdir))
    report_path = workdir / "validation.json"
    report = {
        "success": not failures,
        "labels": labels,
        "dropped": dropped,
        "results": capped(results),
        "failures": capped(failures),
    }
    report_path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    html_path = workdir / "validation.html"
    html_path.write_text(render_html(results, dropped), encoding="utf-8")
    if failures:
        raise DataValidationError(failures, report_path)

    clean = {split: kind.normalise(frame, cfg) for split, frame in frames.items()}
    paths: dict[str, str | None] = {"validation": None, "test": None}
    for split, frame in clean.items():
        path = workdir / f"{split}.raw.parquet"
        frame.to_parquet(path, index=False)
        paths[split] = str(path)
    lengths_path = workdir / "token_lengths.npz"
    np.savez_compressed(lengths_path, allow_pickle=False, **lengths)
    rows = {split: len(frame) for split, frame in clean.items()}
    log.info("data valid: %s rows, %d labels %s", rows, len(labels), labels)
    return ValidatedData(
        train_path=str(paths.pop("train")),
        validation_path=paths["validation"],
        test_path=paths["test"],
        labels=labels,
        fingerprint=combined_fingerprint({s: fingerprint(f) for s, f in clean.items()}),
        rows=rows,
        report_path=str(report_path),
        html_report_path=str(html_path),
        quarantine_path=quarantine_path,
        dropped=dropped,
        encoding_fallback_lines=sum(t.fallback_decoded_lines for t in tables.values()),
        truncated_fraction=truncated_fractions(results),
        token_lengths_path=str(lengths_path),
        seconds=time.perf_counter() - started,
    )
