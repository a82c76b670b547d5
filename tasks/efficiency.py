"""What training costs: FLOPs, model FLOPs utilisation (MFU), and a memory preflight.

Shared by the train stage (per-run efficiency metrics, the preflight check) and ``bench/``.

FLOPs of one training token (forward and backward): ``6 * N + 12 * L * d * s``, where ``N`` is the
number of non-embedding parameters, ``L`` the layers, ``d`` the hidden size and ``s`` the padded
sequence length the token attends over (the attention score and value products, which ``N`` does
not count). Only non-pad tokens count: padding is waste, not work. MFU is achieved FLOP/s divided by
the peak FLOP/s of a large matmul in the training arithmetic (fp32 or bf16) measured on the same
machine.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

GIB = 1024**3


def embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the embedding tables (looked up, not multiplied)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix multiplies: all but the embedding lookups.

    A language-model head tied to the token embedding (GPT-2, BERT's LM head) multiplies every
    position by that table, so it counts once more: its FLOPs are 6 * vocab * hidden per token.
    """
    n = sum(p.numel() for p in model.parameters()) - embedding_params(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if head is not None and any(head.weight is table for table in tables):
        n += head.weight.numel()
    return n


def train_flops_per_token(n_non_embedding: int, layers: int, hidden: int, seq_len: float) -> float:
    """Forward + backward FLOPs of one token: 6N for the weights, 12*L*d*s for attention."""
    return 6.0 * n_non_embedding + 12.0 * layers * hidden * seq_len


def native_bf16(on_gpu: bool) -> bool:
    """Whether this device multiplies bf16 natively (a GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX), so that bf16 autocast is faster than fp32 rather than emulated."""
    if on_gpu:
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(setting: str, on_gpu: bool) -> tuple[str, str]:
    """(``bf16`` or ``fp32``, why) for a ``precision`` setting of ``auto``, ``fp32`` or ``bf16``.

    ``auto`` is bf16 where the device multiplies it natively. Measured on a 2-core AVX-512 BF16
    CPU, MiniLM-L6, batch 32 x 40 tokens: a training step (forward, backward, AdamW) 0.70 s in
    fp32, 0.41 s under bf16 autocast with eager attention; scoring 3,764 tweets 18.7 s in fp32,
    10.4 s in bf16 (one prediction of the 3,764 differed).
    """
    if setting != "auto":
        return setting, "set in the config"
    if native_bf16(on_gpu):
        return "bf16", f"this {'GPU' if on_gpu else 'CPU (AVX-512 BF16 or AMX)'} has native bf16"
    return "fp32", "no native bf16 matmul on this device"


def use_attention(model: Any, precision: str, on_gpu: bool) -> str | None:
    """Give ``model`` the attention kernel for this arithmetic, and return its name when it is not
    the model's default: eager under CPU bf16 (SDPA's bf16 backward on the CPU is slower than
    plain matmuls: 0.54 s against 0.41 s for the step above), the default (SDPA) elsewhere."""
    if precision != "bf16" or on_gpu:
        return None
    model.set_attn_implementation("eager")
    return "eager"


def scoring_arithmetic(
    model: Any, precision: str, device: torch.device
) -> contextlib.AbstractContextManager[Any]:
    """Prepare ``model`` to score in ``precision`` on ``device`` (its attention kernel) and return
    the context to score in: bf16 autocast, or nothing for fp32."""
    use_attention(model, precision, device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@functools.lru_cache(maxsize=4)
def matmul_peak_flops(size: int = 2048, repeats: int = 3, dtype: str = "float32") -> float:
    """Measured FLOP/s of a square matmul on this machine's default device (the MFU denominator).

    Best of three timings of ``repeats`` products, on squares that double from 256 up to
    ``size``: a larger product reaches nearer the peak, and the growth stops once a timing takes
    a tenth of a second. A device that only emulates the dtype (bf16 on a CPU without bf16
    instructions, some hundred times slower) is then measured in about a second instead of
    minutes.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flops = 0.0
    side = min(256, size)
    while True:
        seconds = _best_matmul_seconds(side, repeats, device, getattr(torch, dtype))
        flops = 2.0 * side**3 * repeats / seconds
        if side >= size or seconds > 0.1:
            return flops
        side = min(side * 2, size)


def _best_matmul_seconds(side: int, repeats: int, device: str, dtype: torch.dtype) -> float:
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    for _ in range(2):  # warm up kernels and caches
        a @ b
    best = float("inf")
    for _ in range(3):  # the best of three: a peak, not an average disturbed by other work
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int:
    """Memory this process may still take: free host RAM, or free GPU memory under CUDA."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes that training needs beyond what the process already holds, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    baseline: int
    copies: int = 0  # of the weights: the update check's fingerprint, bf16 autocast's cache

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.copies
            + self.baseline
        )

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.2f} GiB"
            for name in ("baseline", "weights", "gradients", "optimizer", "activations", "copies")
        )
        return f"{self.total / GIB:.2f} GiB ({parts})"


def estimate_training_memory(
    config: Any,
    n_params: int,
    batch_size: int,
    seq_len: int,
    bytes_per_value: int = 4,
    baseline: int = 0,
    shards: int = 1,
    checkpointing: bool = False,
    optimizer_bytes: int = 8,
    weight_bytes: int = 4,
    head_outputs: int = 0,
    copy_bytes: int = 0,
    gradient_params: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one training step of a transformer on one process, from its config.

    Weights, gradients and AdamW's two moments take 4 values per parameter (the moments 2 bytes
    each with an 8-bit optimizer: ``optimizer_bytes``; weights and gradients 2 bytes each in
    bf16: ``weight_bytes``); FSDP's full sharding divides all three by
    the number of ranks (``shards``). Activations kept for the backward pass follow Korthikanti
    et al. (2022) for a transformer layer, in values: ``s*b*h*(17 + 2.5*a*s/h)`` per layer (34 +
    5as/h bytes at 16 bits), plus the embeddings' output and the head's; with activation
    checkpointing only each layer's input is kept, and one layer is recomputed at a time. A
    language model's head adds its logits over ``head_outputs`` (the vocabulary) at every
    position, three fp32 values each: the logits, their log-softmax and its gradient.
    ``gradient_params``: the parameters whose gradients exist at once (all of them unless the
    optimizer steps in the backward pass: then the largest tensor's). ``copy_bytes`` per
    parameter are the copies of the weights a step keeps beside them, whole
    on every rank. ``baseline`` is what the process holds besides the model (libraries, data).
    """
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    heads = config.num_attention_heads
    per_layer = seq_len * batch_size * hidden * (17 + 2.5 * heads * seq_len / hidden)
    kept = (
        layers * seq_len * batch_size * hidden + per_layer if checkpointing else layers * per_layer
    )
    logits = 3 * seq_len * batch_size * head_outputs
    activations = (kept + 2 * seq_len * batch_size * hidden + logits) * bytes_per_value
    return MemoryEstimate(
        weights=n_params * weight_bytes // shards,
        gradients=(n_params if gradient_params is None else gradient_params)
        * weight_bytes
        // shards,
        optimizer=n_params * optimizer_bytes // shards,
        activations=int(activations),
        baseline=baseline,
        copies=n_params * copy_bytes,
    )


def current_rss_bytes() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


def throughput(
    model: torch.nn.Module,
    config: Any,
    tokens: int,
    mean_length: float,
    seconds: float,
    precision: str,
) -> tuple[float, float, float]:
    """(non-pad tokens per second, MFU, the peak FLOP/s it is measured against) of ``tokens``
    trained in ``seconds`` of pure step time, in the arithmetic the step ran in."""
    seconds = max(seconds, 1e-9)
    flops = tokens * train_flops_per_token(
        non_embedding_params(model), config.num_hidden_layers, config.hidden_size, mean_length
    )
    peak = matmul_peak_flops(dtype="bfloat16" if precision == "bf16" else "float32")
    return tokens / seconds, flops / seconds / peak, peak
