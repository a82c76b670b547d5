"""FLOP and memory estimators against hand computations on the tiny model."""

from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification

import tasks.fit
from tasks.config import TrainConfig
from tasks.efficiency import (
    GIB,
    embedding_params,
    estimate_training_memory,
    non_embedding_params,
    train_flops_per_token,
)
from tasks.fit import MemoryPreflightError, fit_memory


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)


def test_parameter_split(tiny):
    c = tiny.config  # vocab 30522, hidden 32, 128 positions, 2 token types
    assert embedding_params(tiny) == (c.vocab_size + 128 + 2) * 32
    assert non_embedding_params(tiny) == tiny.num_parameters() - (c.vocab_size + 130) * 32
    # By hand: 2 layers of (4 attention 32x32 + biases, FFN 32->64->32, 2 LayerNorms),
    # the embedding LayerNorm, the pooler 32x32 and the 2-class head.
    layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 2 * 32
    assert non_embedding_params(tiny) == 2 * layer + 2 * 32 + (32 * 32 + 32) + (32 * 2 + 2)


def test_flops_per_token_by_hand():
    assert train_flops_per_token(1_000, layers=2, hidden=32, seq_len=10) == 6_000 + 12 * 2 * 32 * 10


def test_memory_estimate_by_hand(tiny):
    p = tiny.num_parameters()
    est = estimate_training_memory(tiny.config, p, batch_size=4, seq_len=16, baseline=1000)
    assert (est.weights, est.gradients, est.optimizer) == (4 * p, 4 * p, 8 * p)
    per_layer = 16 * 4 * 32 * (17 + 2.5 * 2 * 16 / 32)
    assert est.activations == int((2 * per_layer + 2 * 16 * 4 * 32) * 4)
    assert est.total == 16 * p + est.activations + 1000
    # A language model's logits (3 fp32 values per position and vocabulary entry), and the
    # copies of the weights a step keeps (the update check's fingerprint, autocast's bf16 cache).
    lm = estimate_training_memory(
        tiny.config, p, batch_size=4, seq_len=16, head_outputs=100, copy_bytes=4, weight_bytes=2
    )
    assert lm.activations - est.activations == 3 * 16 * 4 * 100 * 4
    assert (lm.weights, lm.gradients, lm.copies) == (2 * p, 2 * p, 4 * p)


def test_preflight_fails_with_numbers_and_remedies(tiny, monkeypatch):
    monkeypatch.setattr(tasks.fit, "available_bytes", lambda: 1000)
    with pytest.raises(MemoryPreflightError) as err:
        fit_memory(tiny, TrainConfig(batch_size=32, memory="check"), seq_len=128)
    message = str(err.value)
    assert "at batch 32 and sequence length 128" in message
    assert "GiB is available" in message and "train.memory: auto" in message
    with pytest.raises(MemoryPreflightError) as err:
        fit_memory(tiny, TrainConfig(batch_size=32), seq_len=128)
    message = str(err.value)  # what every option at batch 1 would still need
    assert "(batch 1, gradient_checkpointing True" in message and "would still need" in message
    assert "train.fsdp: full_shard" in message


def need(tiny, batch, **options):
    """What the plan reckons in fp32 arithmetic: the update check's 2-byte fingerprint beside."""
    options.setdefault("copy_bytes", 2)
    return estimate_training_memory(tiny.config, tiny.num_parameters(), batch, 128, **options)


@pytest.fixture
def room(monkeypatch):
    def set_room(free: int) -> None:
        monkeypatch.setattr(tasks.fit, "available_bytes", lambda: free)
        monkeypatch.setattr(tasks.fit, "current_rss_bytes", lambda: 0)

    return set_room


def test_memory_batch_halves_until_it_fits(tiny, room):
    room((need(tiny, 8).total + need(tiny, 4).total) // 2)  # batch 4 fits, 8 does not
    cfg, est, choices = fit_memory(tiny, TrainConfig(batch_size=32, memory="batch"), seq_len=128)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (4, 8)
    assert not cfg.gradient_checkpointing and est == need(tiny, 4)
    assert choices == [
        "batch 32 -> 4, accumulation 1 -> 8 (same effective batch; saves "
        f"{(need(tiny, 32).total - need(tiny, 4).total) / GIB:.2f} GiB)"
    ]


def test_memory_auto_prefers_checkpointing_to_a_batch_below_four(tiny, room):
    # Batch 2 fits without checkpointing, batch 4 does not; batch 4 fits with it.
    checkpointed = need(tiny, 4, checkpointing=True)
    assert need(tiny, 2).total < checkpointed.total < need(tiny, 4).total
    room(checkpointed.total)
    cfg, est, choices = fit_memory(tiny, TrainConfig(batch_size=4), seq_len=128)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.gradient_checkpointing) == (
        4,
        1,
        True,
    )
    saved = need(tiny, 4).total - checkpointed.total
    assert est == checkpointed
    assert choices == [f"gradient_checkpointing True (saves {saved / GIB:.2f} GiB)"]
    # `batch` never turns an option on: it goes below four.
    cfg, _, _ = fit_memory(tiny, TrainConfig(batch_size=4, memory="batch"), seq_len=128)
    assert (cfg.batch_size, cfg.gradient_checkpointing) == (2, False)


def test_memory_auto_takes_an_8bit_adamw_when_one_runs_here(tiny, room, monkeypatch):
    both = need(tiny, 4, checkpointing=True, optimizer_bytes=2)
    room(both.total)
    monkeypatch.setattr(tasks.fit, "low_memory_optim", lambda on_gpu: None)  # none installed
    with pytest.raises(MemoryPreflightError, match="pip install torchao"):
        fit_memory(tiny, TrainConfig(batch_size=4), seq_len=128)
    monkeypatch.setattr(tasks.fit, "low_memory_optim", lambda on_gpu: "adamw_torch_8bit")
    cfg, est, choices = fit_memory(tiny, TrainConfig(batch_size=4), seq_len=128)
    assert (cfg.batch_size, cfg.gradient_checkpointing, cfg.optim) == (
        4,
        True,
        "adamw_torch_8bit",
    )
    assert est == both and [c.split(" (")[0] for c in choices] == [
        "gradient_checkpointing True",
        "optim adamw_torch_8bit",
    ]
    # A run that already fits is left as it is.
    room(need(tiny, 32).total)
    assert fit_memory(tiny, TrainConfig(batch_size=32), seq_len=128)[2] == []


def test_memory_auto_takes_bf16_weights_last_where_the_run_computes_in_bf16(
    tiny, room, monkeypatch
):
    lean = need(tiny, 4, checkpointing=True, optimizer_bytes=2, weight_bytes=2)
    room(lean.total)
    monkeypatch.setattr(tasks.fit, "low_memory_optim", lambda on_gpu: "adamw_torch_8bit")
    cfg, est, choices = fit_memory(tiny, TrainConfig(batch_size=4), seq_len=128, precision="bf16")
    assert (cfg.gradient_checkpointing, cfg.optim, cfg.bf16_weights) == (
        True,
        "adamw_torch_8bit",
        True,
    )
    assert est == lean and choices[-1].startswith("bf16_weights True (saves ")
    # Not in fp32 arithmetic, nor beside an 8-bit AdamW without stochastic rounding.
    with pytest.raises(MemoryPreflightError):
        fit_memory(tiny, TrainConfig(batch_size=4), seq_len=128, precision="fp32")
    monkeypatch.setattr(tasks.fit, "low_memory_optim", lambda on_gpu: "adamw_bnb_8bit")
    with pytest.raises(MemoryPreflightError):
        fit_memory(tiny, TrainConfig(batch_size=4), seq_len=128, precision="bf16")
    with pytest.raises(ValidationError, match=r"bf16_weights needs train\.optim: adamw_torch_8bit"):
        TrainConfig(bf16_weights=True)


def test_memory_auto_steps_in_the_backward_pass_last_and_only_without_accumulation(
    tiny, room, monkeypatch
):
    monkeypatch.setattr(tasks.fit, "low_memory_optim", lambda on_gpu: None)
    largest = max(p.numel() for p in tiny.parameters())
    lean = need(tiny, 4, checkpointing=True, gradient_params=largest)
    room(lean.total)
    cfg, est, choices = fit_memory(tiny, TrainConfig(batch_size=4), seq_len=128)
    assert (cfg.gradient_checkpointing, cfg.optimizer_in_backward) == (True, True)
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (4, 1)  # never halved with it
    assert est == lean and est.gradients == 4 * largest
    assert choices[-1].startswith("optimizer_in_backward True (saves ")
    assert choices[-1].endswith("; no gradient clipping)")
    # Accumulation needs the gradients kept: the plan halves the batch instead.
    cfg, _, _ = fit_memory(
        tiny, TrainConfig(batch_size=4, gradient_accumulation_steps=2), seq_len=128
    )
    assert not cfg.optimizer_in_backward and cfg.batch_size < 4
    with pytest.raises(ValidationError, match=r"optimizer_in_backward .*accumulation_steps 1"):
        TrainConfig(optimizer_in_backward=True, gradient_accumulation_steps=2)


def test_ranks_on_one_machine_share_its_free_memory(monkeypatch):
    monkeypatch.setattr(tasks.fit, "available_bytes", lambda: 1000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert tasks.fit.host_share_bytes(on_gpu=False) == 250
    assert tasks.fit.host_share_bytes(on_gpu=True) == 1000  # a device per rank


def _plan_on_rank(rank: int, port: int, results) -> None:
    """Two plans on each of two gloo ranks: first both find one (rank 0's needs less), then rank
    1 finds none."""
    import os

    os.environ |= {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    est = estimate_training_memory(_Config(), 1000 * (rank + 1), 4, 16)
    mine = (TrainConfig(batch_size=8 // (rank + 1)), est, [f"rank {rank}'s choice"])
    cfg, agreed, choices = tasks.fit.agree(mine, on_gpu=False)
    results[rank] = (cfg.batch_size, agreed.total, choices)
    try:
        tasks.fit.agree(mine if rank == 0 else MemoryPreflightError("too big"), on_gpu=False)
    except MemoryPreflightError as error:
        results[f"{rank} failed"] = str(error)


class _Config:
    num_hidden_layers, hidden_size, num_attention_heads = 2, 32, 2


@pytest.mark.integration
def test_ranks_agree_on_the_leanest_plan_or_all_stop():
    """Each rank plans from the memory it sees; all take the plan that needs least, and a rank
    that found none stops them all (none is left waiting in a collective)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_plan_on_rank, args=(port, results), nprocs=2, start_method="spawn")
        got = dict(results)
    lean = estimate_training_memory(_Config(), 1000, 4, 16).total
    assert got[0] == got[1] == (8, lean, ["rank 0's choice"])
    assert got["0 failed"] == got["1 failed"] == "rank 1: too big"


def test_memory_options_shrink_the_estimate_as_they_should(tiny):
    p = tiny.num_parameters()
    full = estimate_training_memory(tiny.config, p, batch_size=4, seq_len=16)
    sharded = estimate_training_memory(tiny.config, p, batch_size=4, seq_len=16, shards=4)
    # FSDP full_shard: each of 4 ranks holds a quarter of weights, gradients and AdamW state.
    assert (sharded.weights, sharded.gradients, sharded.optimizer) == (p, p, 2 * p)
    assert sharded.activations == full.activations  # each rank still runs its own batch
    eight_bit = estimate_training_memory(tiny.config, p, 4, 16, optimizer_bytes=2)
    assert eight_bit.optimizer == 2 * p
    checkpointed = estimate_training_memory(tiny.config, p, 4, 16, checkpointing=True)
    per_layer = 16 * 4 * 32 * (17 + 2.5 * 2 * 16 / 32)
    kept = 2 * 16 * 4 * 32 + per_layer  # each layer's input, and one layer recomputed
    assert checkpointed.activations == int((kept + 2 * 16 * 4 * 32) * 4)
    assert checkpointed.activations < full.activations


def test_what_only_cuda_offers_is_refused_on_the_cpu_by_name():
    from tasks.train import sharding_arguments

    with pytest.raises(ValueError, match=r"train\.optim adamw_bnb_8bit needs CUDA"):
        sharding_arguments(TrainConfig(optim="adamw_bnb_8bit"), on_gpu=False)
    sharded = dict(fsdp="full_shard", num_processes=2, fsdp_cpu_offload=True)
    on_gpu = sharding_arguments(TrainConfig(**sharded, gradient_checkpointing=True), True)
    assert on_gpu["fsdp"] is True and on_gpu["fsdp_config"]["cpu_offload"] is True
    assert on_gpu["fsdp_config"]["activation_checkpointing"] is True
    assert on_gpu["activation_checkpointing"] is False
    # CPU ranks shard too (FinetuneTrainer); their shards are in host memory already.
    on_cpu = sharding_arguments(TrainConfig(**sharded), False)
    assert on_cpu["fsdp"] is True and on_cpu["fsdp_config"]["cpu_offload"] is False
    with pytest.raises(ValidationError, match=r"train.fsdp full_shard shards over the ranks"):
        TrainConfig(fsdp="full_shard")
    assert sharding_arguments(TrainConfig(gradient_checkpointing=True), False) == {
        "activation_checkpointing": True
    }


def test_precision_follows_the_setting_or_the_hardware(monkeypatch):
    from tasks.efficiency import resolve_precision, use_attention

    assert resolve_precision("fp32", on_gpu=False) == ("fp32", "set in the config")
    assert resolve_precision("bf16", on_gpu=False)[0] == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda: False)
        precision, why = resolve_precision("auto", on_gpu=False)
        assert precision == expected, why

    # Eager attention only where SDPA's bf16 backward is the slow path: bf16 on the CPU.
    class Model:
        kernel = "sdpa"

        def set_attn_implementation(self, name: str) -> None:
            self.kernel = name

    for precision, on_gpu, kernel in (("bf16", False, "eager"), ("fp32", False, "sdpa")):
        model = Model()
        assert use_attention(model, precision, on_gpu) == (None if kernel == "sdpa" else kernel)
        assert model.kernel == kernel
    model = Model()
    assert use_attention(model, "bf16", on_gpu=True) is None and model.kernel == "sdpa"


def test_training_arguments_carry_the_precision_and_the_fused_optimizer(tmp_path):
    from tasks.kinds import get_kind
    from tasks.train import setup_args

    kind = get_kind("text-classification")
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        cfg = TrainConfig(precision=precision)
        args = setup_args(cfg, tmp_path, 1.0, 1e-4, kind, 8)
        assert args.bf16 is bf16
        assert args.optim == "adamw_torch_fused"  # one kernel per step, on CPU as on CUDA


def test_process_start_is_read_to_the_clock_tick():
    """A child's start lies between the moment it was spawned and the child's own clock: not a
    second early, as the boot time in whole seconds (psutil's create_time) can put it."""
    import subprocess
    import sys
    import time

    code = (
        "import time; from tasks.tracking import process_started; "
        "print(process_started(), time.time())"
    )
    spawned = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    started, child_now = map(float, out.stdout.split())
    tick = 0.011  # the kernel counts a process's start in 10 ms ticks
    assert spawned - tick <= started <= child_now


def test_a_command_logs_its_start_whole_time_and_overhead(tmp_path, monkeypatch):
    """``time/cold_start_s``: process start to the start of the run's first stage;
    ``efficiency/process_overhead_fraction``: the share of the whole command outside work."""
    import time

    import mlflow
    from mlflow import MlflowClient

    from tasks import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    born = time.time() - 30.0  # as if this process had started 30 s ago
    monkeypatch.setattr(tracking, "process_started", lambda: born)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"))
    client.log_metric(run.info.run_id, "efficiency/work_s", 12.0)
    first_stage = born + 5.5  # the flow tags when its first stage starts
    client.set_tag(run.info.run_id, tracking.FIRST_STAGE_TAG, f"{first_stage:.3f}")
    mlflow.set_tracking_uri(uri)
    times = tracking.log_process_times(run.info.run_id)
    assert times["time/cold_start_s"] == pytest.approx(5.5, abs=1e-3)
    assert 30.0 <= times["time/process_s"] < 90.0
    assert times["efficiency/process_overhead_fraction"] == pytest.approx(
        (times["time/process_s"] - 12.0) / times["time/process_s"]
    )
    logged = client.get_run(run.info.run_id).data.metrics
    assert {k: logged[k] for k in times} == pytest.approx(times)


def test_torch_threads_follow_the_cores_other_processes_leave_free(monkeypatch):
    import subprocess
    import sys

    import torch

    from tasks.threads import CoreWatch, ThreadFitter

    cores = len(CoreWatch().cpus)
    if cores < 2:
        pytest.skip("needs 2 cores")
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fitter = ThreadFitter(every_s=0.5)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        fitter.start(setting=None, wait_s=1.0)
        assert torch.get_num_threads() <= cores - 1  # one core is taken
        assert fitter.refit() is None  # read again only once every_s has passed
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(threads)
    try:
        assert fitter.start(setting=1) in (None, 1) and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's word
        assert fitter.start(setting=None, wait_s=0.1) is None
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_an_8bit_adamw_without_torchao_is_refused_before_the_run_starts(monkeypatch):
    import importlib.util

    from tasks.config import RunConfig
    from tasks.preflight import check_training

    cfg = RunConfig.model_validate({"train": {"optim": "adamw_torch_8bit"}})
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    [problem] = check_training(cfg)
    assert problem.startswith("train.optim: adamw_torch_8bit needs torchao")
    assert "pip install 'fulltune[lowmem]'" in problem
    assert check_training(RunConfig()) == []
