"""The data contract: a Great Expectations suite run on every raw table before anything is trained.

The suites are reviewable JSON files in ``data/expectations/`` (one per task type). Column names are
filled in from the config, and thresholds and the label set are GE suite parameters, so the same
file serves every data set.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel

from tasks.config import DataConfig
from tasks.sources import Table, combined_fingerprint, fingerprint, read_table

log = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).resolve().parent.parent / "data" / "expectations"
EXAMPLES_SHOWN = 3


class DataValidationError(ValueError):
    """The data broke its contract. ``str()`` is a report a person can act on."""

    def __init__(self, failures: list[dict[str, Any]], report_path: Path | None = None):
        self.failures = failures
        self.report_path = report_path
        super().__init__(render_failures(failures, report_path))


class ValidatedData(BaseModel):
    """What passed validation: normalised tables on disk (columns ``text``, ``label``)."""

    train_path: str
    validation_path: str | None
    test_path: str | None
    labels: list[str]
    fingerprint: str
    rows: dict[str, int]
    report_path: str
    encoding_fallback_lines: int


def load_suite(task: str, text_column: str, label_column: str) -> Any:
    """The GE ``ExpectationSuite`` for a task type, with the configured column names filled in."""
    import great_expectations as gx

    path = SUITES_DIR / f"{task}.json"
    columns = {"text_column": text_column, "label_column": label_column}
    text = path.read_text(encoding="utf-8")
    for key, name in columns.items():
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


def run_suite(
    frame: pd.DataFrame, name: str, suite: Any, parameters: dict[str, Any]
) -> dict[str, Any]:
    """Validate one table with GE and return the JSON-able validation result."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}  # type: ignore[assignment]
    asset = context.data_sources.add_pandas("fulltune").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": frame}
    )
    result = batch.validate(
        suite,
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES_SHOWN},
        expectation_parameters=parameters,
    )
    return result.to_json_dict()


def summarize_failures(result: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    """One row per failed expectation: which file, column, rule, how many rows, examples."""
    failures = []
    for item in result["results"]:
        if item["success"]:
            continue
        config = item["expectation_config"]
        outcome = item.get("result") or {}
        exception = (item.get("exception_info") or {}).get("exception_message")
        failures.append(
            {
                "source": origin,
                "column": config["kwargs"].get("column"),
                "rule": (config.get("meta") or {}).get("rule", config["type"]),
                "expectation": config["type"],
                "unexpected_count": outcome.get("unexpected_count"),
                "element_count": outcome.get("element_count"),
                "examples": [
                    {"row": i, "value": v}
                    for i, v in zip(
                        outcome.get("partial_unexpected_index_list") or [],
                        outcome.get("partial_unexpected_list") or [],
                        strict=False,
                    )
                ],
                "observed": outcome.get("observed_value"),
                "error": exception,
            }
        )
    return failures


def render_failures(failures: list[dict[str, Any]], report_path: Path | None = None) -> str:
    """A plain-text report of failed expectations, one paragraph each."""
    lines = [f"data validation failed: {len(failures)} expectation(s) not met"]
    for f in failures:
        where = f"{f['source']}" + (f", column {f['column']!r}" if f["column"] else "")
        lines.append(f"- {where}: {f['rule']} [{f['expectation']}]")
        if f["unexpected_count"] is not None:
            lines.append(f"    {f['unexpected_count']} of {f['element_count']} rows fail")
        for ex in f["examples"]:
            value = ex["value"] if not isinstance(ex["value"], str) else _clip(ex["value"])
            lines.append(f"    e.g. row {ex['row']} (0-based, header excluded): {value!r}")
        if f["observed"] is not None:
            lines.append(f"    observed: {f['observed']}")
        if f["error"] and f["column"]:
            lines.append("    the column is missing or could not be checked")
    if report_path is not None:
        lines.append(f"full Great Expectations result: {report_path}")
    return "\n".join(lines)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _normalise(table: Table, cfg: DataConfig) -> pd.DataFrame:
    frame = table.frame
    return pd.DataFrame(
        {
            "text": frame[cfg.text_column].astype(str).to_numpy(),
            "label": frame[cfg.label_column].to_numpy(),
        }
    )


def validate_data(
    cfg: DataConfig, workdir: Path, task: str = "text-classification"
) -> ValidatedData:
    """Read every configured source, validate each with the task's GE suite, write clean tables.

    The label set is ``cfg.labels`` when declared, else inferred from the training table and then
    frozen: validation and test labels must fall inside it.

    Raises:
        SourceError: a source cannot be read.
        DataValidationError: any expectation fails on any table; nothing is written for training.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sources = {"train": (cfg.train, cfg.train_split)}
    if cfg.validation:
        sources["validation"] = (cfg.validation, cfg.validation_split)
    if cfg.test:
        sources["test"] = (cfg.test, cfg.test_split)
    tables = {split: read_table(name, hub_split) for split, (name, hub_split) in sources.items()}
    for table in tables.values():
        if cfg.label_column in table.frame.columns:
            table.frame[cfg.label_column] = labels_as_strings(table.frame[cfg.label_column])

    train_frame = tables["train"].frame
    labels = cfg.labels or (
        infer_labels(train_frame[cfg.label_column]) if cfg.label_column in train_frame else []
    )
    parameters = {"labels": labels, "min_chars": cfg.min_chars, "max_chars": cfg.max_chars}
    suite = load_suite(task, cfg.text_column, cfg.label_column)

    results, failures = {}, []
    for split, table in tables.items():
        results[split] = run_suite(table.frame, split, suite, parameters)
        failures += summarize_failures(results[split], table.origin)
    if not cfg.labels and len(labels) < 2 and cfg.label_column in train_frame:
        failures.append(
            {
                "source": tables["train"].origin,
                "column": cfg.label_column,
                "rule": "at least two classes",
                "expectation": "label set",
                "unexpected_count": None,
                "element_count": len(train_frame),
                "examples": [],
                "observed": f"labels found: {labels}",
                "error": None,
            }
        )

    report_path = workdir / "validation.json"
    report = {"success": not failures, "labels": labels, "results": results, "failures": failures}
    report_path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    if failures:
        raise DataValidationError(failures, report_path)

    frames = {split: _normalise(table, cfg) for split, table in tables.items()}
    paths: dict[str, str | None] = {"validation": None, "test": None}
    for split, frame in frames.items():
        path = workdir / f"{split}.raw.parquet"
        frame.to_parquet(path, index=False)
        paths[split] = str(path)
    rows = {split: len(frame) for split, frame in frames.items()}
    fallbacks = sum(t.fallback_decoded_lines for t in tables.values())
    log.info("data valid: %s rows, %d labels %s", rows, len(labels), labels)
    return ValidatedData(
        train_path=str(paths.pop("train")),
        validation_path=paths["validation"],
        test_path=paths["test"],
        labels=labels,
        fingerprint=combined_fingerprint({s: fingerprint(f) for s, f in frames.items()}),
        rows=rows,
        report_path=str(report_path),
        encoding_fallback_lines=fallbacks,
    )
