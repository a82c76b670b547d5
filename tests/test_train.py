"""The training recipe: its schedule arithmetic, its sampler, and Trainer runs on a tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config import DataConfig, ModelConfig, TrainConfig
from tasks.kinds import get_kind
from tasks.results import TrainJob
from tasks.sizing import auto_schedule, global_batch
from tasks.train import train

from .conftest import LABELS, data_config, make_rows, prepare


def test_auto_schedule_scales_with_data_and_model():
    cfg = TrainConfig()
    assert auto_schedule(cfg, 600, 22_700_000, 1)[0] == 10  # 19 steps/epoch: the cap
    assert auto_schedule(cfg, 35_000, 22_700_000, 1)[0] == 2  # 1,094 steps/epoch: the floor
    assert auto_schedule(cfg, 3_200, 22_700_000, 1)[0] == 3  # 100 steps/epoch
    assert auto_schedule(cfg, 600, 22_700_000, 1)[1] == pytest.approx(1.049e-4, rel=1e-3)
    assert auto_schedule(cfg, 600, 110_000_000, 1)[1] == pytest.approx(4.77e-5, rel=1e-2)
    explicit = TrainConfig(epochs=1.5, learning_rate=3e-5)
    assert auto_schedule(explicit, 600, 22_700_000, 1) == (1.5, 3e-5)


def test_batch_arithmetic_counts_every_process():
    """``batch_size`` is per process: 2 processes take half the steps per epoch, so ``auto``
    needs more epochs to reach the same number of optimizer steps."""
    cfg = TrainConfig(batch_size=16, gradient_accumulation_steps=2)
    assert global_batch(cfg, 1) == 32 and global_batch(cfg, 4) == 128
    assert auto_schedule(cfg, 3_200, 22_700_000, 1)[0] == 3  # 100 steps/epoch
    assert auto_schedule(cfg, 3_200, 22_700_000, 2)[0] == 6  # 50 steps/epoch


@pytest.fixture(scope="module")
def tokenized(tiny_model_dir: Path, tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    path = work / "rows.csv"
    make_rows(90).to_csv(path, index=False)
    cfg = data_config(path, validation_fraction=0.2, test_fraction=0.1)
    return prepare(cfg, ModelConfig(name_or_path=str(tiny_model_dir), max_length=32), work)[2]


def run(
    tokenized, tiny_model_dir: Path, tmp_path: Path, callbacks=(), checkpoints=None, **overrides
):
    cfg = TrainConfig(**{"batch_size": 8, "logging_steps": 1, "warmup_fraction": 0.0} | overrides)
    job = TrainJob(
        checkpoint_dir=checkpoints,
        tokenized=tokenized,
        labels=LABELS,
        model_cfg=ModelConfig(name_or_path=str(tiny_model_dir), max_length=32),
        cfg=cfg,
        eval_batch_size=64,
        task="text-classification",
        workdir=str(tmp_path),
    )
    return train(job, get_kind("text-classification"), callbacks)


@pytest.mark.flow
def test_early_stopping_stops(tokenized, tiny_model_dir: Path, tmp_path: Path):
    # A learning rate this small cannot move validation F1: patience runs out.
    result = run(
        tokenized,
        tiny_model_dir,
        tmp_path,
        learning_rate=1e-9,
        epochs=10,
        eval_steps=2,
        early_stopping_patience=2,
    )
    assert result.stopped_early
    assert result.global_step < 10 * 8  # 63 rows / batch 8 = 8 steps per epoch
    assert len(result.validation_curve) == result.global_step // 2


@pytest.mark.flow
def test_selection_keeps_the_best_validation_checkpoint(tokenized, tiny_model_dir, tmp_path):
    result = run(
        tokenized,
        tiny_model_dir,
        tmp_path,
        learning_rate=3e-3,
        epochs=4,
        eval_steps=4,
        early_stopping_patience=None,
    )
    curve = result.validation_curve
    best = max(curve, key=lambda point: point["macro_f1"])  # the first of equal maxima wins
    assert result.best_step == best["step"]
    # The saved model is that checkpoint: its validation macro F1 is the best one of the curve.
    assert result.validation["macro_f1"] == pytest.approx(best["macro_f1"])


@pytest.mark.flow
def test_collapse_guard_fires_on_a_one_class_model(tokenized, tiny_model_dir, tmp_path):
    # Weights that make every class but the first worthless teach the model one answer.
    result = run(
        tokenized,
        tiny_model_dir,
        tmp_path,
        learning_rate=3e-3,
        max_steps=24,
        class_weights=[1.0, 1e-4, 1e-4],
        select_best=False,
    )
    assert result.collapse is not None and result.collapse.startswith("collapsed")


def test_balanced_sampler_evens_out_classes_and_repeats_per_epoch():
    from tasks.trainer import EpochSeededBalancedSampler

    labels = np.array([0] * 900 + [1] * 100)
    sampler = EpochSeededBalancedSampler(labels, seed=3)
    first = list(sampler)
    assert len(first) == 1000
    share = np.mean(labels[first] == 1)
    assert 0.45 < share < 0.55  # 10% of the rows, half of the draws
    assert list(sampler) == first  # same epoch, same order: a resumed run sees the same batches
    sampler.set_epoch(1)
    assert list(sampler) != first


@pytest.mark.slow
def test_class_weights_move_predictions_off_the_majority_class(tmp_path: Path):
    """The shipped MiniLM on 600 tweets of the demo corpus, 65% negative (data/imbalanced)."""
    from tasks.kinds.classification import predict_ids

    root = Path(__file__).resolve().parent.parent / "data" / "imbalanced"
    cfg = DataConfig(
        train=str(root / "train.csv"),
        test=str(root / "test.csv"),
        text_column="text",
        label_column="sentiment",
        labels=["negative", "neutral", "positive"],
    )
    model_cfg = ModelConfig(max_length=64)
    data, _, tokenized = prepare(cfg, model_cfg, tmp_path)
    from datasets import load_from_disk

    test = load_from_disk(tokenized.path)["test"].select(range(600))
    majority_share = {}
    for weights in ("none", "auto"):
        train_cfg = TrainConfig(
            epochs=2,
            learning_rate=1e-4,
            class_weights=weights,
            select_best=False,
            early_stopping_patience=None,
        )
        kind = get_kind("text-classification")
        job = TrainJob(
            tokenized=tokenized,
            labels=data.labels,
            model_cfg=model_cfg,
            cfg=train_cfg,
            eval_batch_size=64,
            task="text-classification",
            workdir=str(tmp_path / weights),
        )
        result = train(job, kind)
        predicted = predict_ids(result.model_dir, test, 64)
        majority_share[weights] = float(np.mean(predicted == 0))
    assert majority_share["auto"] < majority_share["none"], majority_share


def test_sorted_batched_scoring_predicts_what_row_by_row_scoring_does(
    tokenized, tiny_model_dir: Path
):
    """Length-sorted batches change only the order of work: every row gets its own prediction."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.kinds.classification import predict_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [f"{text} {' the day' * (i % 9)}" for i, text in enumerate(make_rows(40)["review"])]
    encoded = tokenizer(texts)
    split = Dataset.from_dict(dict(encoded) | {"length": [len(x) for x in encoded["input_ids"]]})
    assert len(set(split["length"])) > 5  # rows of several lengths, in no particular order
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():  # the unsorted path: one row at a time, no padding at all
        one_by_one = [
            int(
                model(
                    **{k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask")}
                ).logits.argmax(-1)
            )
            for row in split
        ]
    for batch_size in (1, 7, 64):
        assert predict_ids(str(tiny_model_dir), split, batch_size).tolist() == one_by_one
    # In bf16 the same holds against bf16 scoring one row at a time.
    bf16_one_by_one = predict_ids(str(tiny_model_dir), split, 1, "bf16").tolist()
    for batch_size in (7, 64):
        assert predict_ids(str(tiny_model_dir), split, batch_size, "bf16").tolist() == (
            bf16_one_by_one
        )


@pytest.mark.flow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_train_every_weight(tokenized, tiny_model_dir, tmp_path, precision):
    """bf16 autocast keeps fp32 weights, gradients and AdamW state: every tensor moves, and the
    MFU is taken against the matmul peak of the arithmetic used."""
    result = run(tokenized, tiny_model_dir, tmp_path, precision=precision, max_steps=4)
    assert result.tensors_updated == result.tensors_total
    assert result.notes["train.precision"].startswith(precision)
    assert result.mfu > 0 and result.matmul_peak_flops > 0


def room_for(monkeypatch, free: int) -> None:
    """The machine as the memory plan sees it: ``free`` bytes, none held by the process yet."""
    import tasks.fit
    import tasks.train

    monkeypatch.setattr(tasks.fit, "available_bytes", lambda: free)
    for module in (tasks.fit, tasks.train):
        monkeypatch.setattr(module, "current_rss_bytes", lambda: 0)


@pytest.mark.flow
def test_a_short_memory_plan_trains_in_bf16_with_8bit_adamw(
    tokenized, tiny_model_dir, tmp_path, monkeypatch
):
    """Memory for nothing but every option: the plan turns on gradient checkpointing, torchao's
    8-bit AdamW and bf16 weights, and training still moves every tensor (stochastic rounding
    keeps updates below bf16's step) and saves a bf16 model that loads back."""
    pytest.importorskip("torchao")
    from transformers import AutoModelForSequenceClassification

    from tasks.efficiency import estimate_training_memory

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    lean = estimate_training_memory(
        model.config,
        model.num_parameters(),
        8,
        32,
        checkpointing=True,
        optimizer_bytes=2,
        weight_bytes=2,
        copy_bytes=2,
    )
    room_for(monkeypatch, lean.total)
    result = run(
        tokenized,
        tiny_model_dir,
        tmp_path,
        precision="bf16",
        max_steps=4,
        learning_rate=1e-3,
        select_best=False,
    )
    plan = result.notes["train.memory"]
    for choice in ("gradient_checkpointing True", "optim adamw_torch_8bit", "bf16_weights True"):
        assert choice in plan
    assert result.tensors_updated == result.tensors_total
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert saved.dtype == torch.bfloat16


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,  # one tensor whose gradient two places of the pass add to
    )
    return LlamaForCausalLM(config)


def _steps(model, optimizer, batches, schedule=None):
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()


def test_the_step_in_the_backward_pass_is_adamws_step_and_resumes_exactly():
    """Per-parameter AdamW stepped from the backward pass lands where one AdamW over all the
    parameters does, under the same schedule and weight decay; it frees each gradient once
    used; and its checkpoint (state and schedule) continues bit for bit."""
    from torch.optim.lr_scheduler import LambdaLR

    from tasks.trainer import InBackwardOptimizer

    batches = [
        torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(5)
    ]
    decay = lambda model: [(p, 0.0 if p.ndim == 1 else 0.1) for p in model.parameters()]  # noqa: E731
    kwargs = {"lr": 1e-2, "fused": True}
    plain, stepped = _tiny_llama(), _tiny_llama()
    reference = torch.optim.AdamW(
        [{"params": [p], "weight_decay": d} for p, d in decay(plain)], **kwargs
    )
    in_backward = InBackwardOptimizer(decay(stepped), torch.optim.AdamW, kwargs)
    warm = lambda step: min(1.0, (step + 1) / 3)  # noqa: E731
    _steps(plain, reference, batches[:3], LambdaLR(reference, warm))
    schedule = LambdaLR(in_backward, warm)
    for ids in batches[:3]:
        stepped(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in stepped.parameters())  # stepped and freed
        in_backward.step()
        schedule.step()
    for a, b in zip(plain.parameters(), stepped.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Read as one state (as the Trainer's callbacks do) without adding to any optimizer's own.
    assert len(list(in_backward.state.values())) == len(list(stepped.parameters()))
    # A checkpoint taken now and loaded into a fresh copy continues as the original does.
    buffer = io.BytesIO()  # as the Trainer writes it, so nothing is shared with the original
    torch.save((in_backward.state_dict(), schedule.state_dict(), stepped.state_dict()), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _tiny_llama(1)
    resumed.load_state_dict(saved[2])
    optimizer = InBackwardOptimizer(decay(resumed), torch.optim.AdamW, kwargs)
    resumed_schedule = LambdaLR(optimizer, warm)  # the Trainer's order: built, then loaded
    optimizer.load_state_dict(saved[0])
    resumed_schedule.load_state_dict(saved[1])
    for model, opt, sched in (
        (stepped, in_backward, schedule),
        (resumed, optimizer, resumed_schedule),
    ):
        _steps(model, opt, batches[3:], sched)
    for a, b in zip(stepped.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    in_backward.remove_hooks()
    before = [p.clone() for p in stepped.parameters()]
    stepped(input_ids=batches[0], labels=batches[0]).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, stepped.parameters(), strict=True))


@pytest.mark.flow
def test_a_memory_plan_that_steps_in_the_backward_pass_trains_without_all_gradients(
    tokenized, tiny_model_dir, tmp_path, monkeypatch
):
    """Memory for nothing but the step in the backward pass at the configured batch: the plan
    takes it (after the options before it), says clipping is off, and training moves every
    tensor with no gradient held when the Trainer's optimizer step comes."""
    from transformers import AutoModelForSequenceClassification

    import tasks.fit
    from tasks.efficiency import estimate_training_memory

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    monkeypatch.setattr(tasks.fit, "low_memory_optim", lambda on_gpu: None)  # fp32 AdamW only
    from datasets import load_from_disk

    longest = max(load_from_disk(tokenized.path)["train"]["length"])  # what the plan sizes for
    lean = estimate_training_memory(
        model.config,
        model.num_parameters(),
        4,  # the plan's floor: the batch is not halved first
        longest,
        checkpointing=True,
        copy_bytes=2,
        gradient_params=max(p.numel() for p in model.parameters()),
    )
    room_for(monkeypatch, lean.total)
    result = run(
        tokenized,
        tiny_model_dir,
        tmp_path,
        precision="fp32",
        batch_size=4,
        max_steps=4,
        select_best=False,
    )
    plan = result.notes["train.memory"]
    assert "gradient_checkpointing True" in plan
    assert "optimizer_in_backward True" in plan and "no gradient clipping" in plan
    assert result.tensors_updated == result.tensors_total
    assert result.state_bytes["gradients"] == 0 and result.state_bytes["optimizer"] > 0


class _Crash(RuntimeError):
    pass


@pytest.mark.flow
def test_a_run_stepping_in_the_backward_pass_resumes_from_its_checkpoint_bit_for_bit(
    tokenized, tiny_model_dir, tmp_path
):
    """Stopped after its first checkpoint and run again, a run whose optimizer steps in the
    backward pass resumes (every parameter's optimizer state, the schedule) and ends with the
    weights of the run that was never stopped."""
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise _Crash("stopped")

    settings = {
        "precision": "fp32",
        "max_steps": 8,
        "checkpoint_steps": 4,
        "select_best": False,
        "optimizer_in_backward": True,
        "threads": 1,
    }
    run(tokenized, tiny_model_dir, tmp_path / "whole", **settings)
    crashed = tmp_path / "crashed"
    with pytest.raises(_Crash):
        run(tokenized, tiny_model_dir, crashed, [CrashAfter()], str(crashed / "ckpt"), **settings)
    resumed = run(tokenized, tiny_model_dir, crashed, checkpoints=str(crashed / "ckpt"), **settings)
    assert resumed.resumed_from_step == 4
    whole, again = (
        AutoModelForSequenceClassification.from_pretrained(path / "model").state_dict()
        for path in (tmp_path / "whole", crashed)
    )
    assert all(torch.equal(whole[k], again[k]) for k in whole)
