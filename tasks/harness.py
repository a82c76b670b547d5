"""lm-evaluation-harness on the fine-tuned and the base model: general capability, before and
after, per task and document, for the forgetting gate.

Run through lm-eval's Python API (``simple_evaluate`` with an ``HFLM`` wrapped around the model in
memory), with ``log_samples`` so every document's score is kept and the two models can be compared
document by document. Standard tasks need the hub; offline, a task YAML with ``dataset_path: json``
and local ``data_files`` under ``eval.lm_eval.include_path`` runs as it is.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from tasks.config import LmEvalConfig
from tasks.results import HarnessResult, HarnessTask

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SKIP = {"alias", "name", "sample_len", "samples"}


def harness_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: LmEvalConfig,
    batch_size: int,
) -> dict[str, dict[str, Any]]:
    """Every task's primary metric, its stderr and per-document scores: ``{task: {...}}``.

    The primary metric is ``acc`` where the task has it, else its first per-document metric.

    Raises:
        ValueError: a task lm-eval does not know, naming the include path searched.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=cfg.include_path)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" in {cfg.include_path}" if cfg.include_path else ""
        raise ValueError(
            f"eval.lm_eval.tasks: {unknown} not found{where} (lm-eval knows "
            f"{len(manager.all_tasks)} tasks; local task YAMLs go in eval.lm_eval.include_path)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        task_manager=manager,
        limit=cfg.limit,
        num_fewshot=cfg.num_fewshot,
        apply_chat_template=cfg.apply_chat_template,
        log_samples=True,
    )
    assert out is not None  # None only on ranks other than 0
    scores: dict[str, dict[str, Any]] = {}
    for task, results in out["results"].items():
        samples = out["samples"].get(task, [])
        if not samples:
            continue  # a group's aggregate: its member tasks carry the documents
        names = [k.split(",")[0] for k in results if k.split(",")[0] not in SKIP]
        names = [n for n in names if not n.endswith("_stderr") and n in samples[0]]
        if not names:
            continue
        metric = "acc" if "acc" in names else names[0]
        key = next(k for k in results if k.split(",")[0] == metric)
        stderr = results.get(key.replace(metric, f"{metric}_stderr", 1))
        higher = out.get("higher_is_better", {}).get(task, {}).get(metric, True)
        scores[task] = {
            "metric": metric,
            "value": float(results[key]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
            "higher_is_better": bool(higher),
            "docs": {int(s["doc_id"]): float(s[metric]) for s in samples},
        }
    return scores


def run_harness(
    fine_tuned: PreTrainedModel,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: LmEvalConfig,
    batch_size: int,
) -> HarnessResult:
    """The configured tasks on both models, paired by document."""
    started = time.perf_counter()
    after = harness_scores(fine_tuned, tokenizer, cfg, batch_size)
    before = harness_scores(base, tokenizer, cfg, batch_size)
    tasks = []
    for name, scores in after.items():
        if name not in before:
            continue
        docs = sorted(set(scores["docs"]) & set(before[name]["docs"]))
        tasks.append(
            HarnessTask(
                name=name,
                metric=scores["metric"],
                higher_is_better=scores["higher_is_better"],
                after=scores["value"],
                before=before[name]["value"],
                after_stderr=scores["stderr"],
                before_stderr=before[name]["stderr"],
                after_docs=[scores["docs"][d] for d in docs],
                before_docs=[before[name]["docs"][d] for d in docs],
            )
        )
    return HarnessResult(
        tasks=tasks,
        chat_template=cfg.apply_chat_template,
        limit=cfg.limit,
        seconds=time.perf_counter() - started,
    )
