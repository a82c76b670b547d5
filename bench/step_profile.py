"""Where an SFT training step on the shipped SmolLM2 spends its time, against the matmul peak.

One step is forward, backward and the optimizer on random token batches (half of each row's
targets masked, as answer-only loss masks prompts), timed per part for each arithmetic the
recipe could run (medians of four steps after two warm-up steps), then one step under
torch.profiler by operator, so the share of the matrix products and of everything around them
is measured rather than guessed::

    .venv/bin/python -m bench.step_profile [--batch 32] [--length 96] [--variants ...]

The FLOPs of a step are 6 x parameters x tokens (the tied head counted once), as the bench's MFU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

# name: (attention, bf16 autocast, weights in bf16, fused AdamW, torch.compile)
VARIANTS: dict[str, tuple[str, bool, bool, bool, bool]] = {
    "fp32": ("eager", False, False, True, False),
    "bf16 autocast, SDPA": ("sdpa", True, False, True, False),
    "bf16 autocast, eager (the recipe)": ("eager", True, False, True, False),
    "bf16 autocast, eager, foreach AdamW": ("eager", True, False, False, False),
    "bf16 weights, eager": ("eager", False, True, True, False),
    "bf16 autocast, eager, torch.compile": ("eager", True, False, True, True),
}


def step_parts(folder: str, variant: str, batch: int, length: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    attention, autocast, bf16_weights, fused, compiled = VARIANTS[variant]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention)
    model.train()
    if bf16_weights:
        model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-5, fused=fused or None, foreach=None if fused else True
    )
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    labels = ids.clone()
    labels[:, : length // 2] = -100

    def step() -> tuple[float, float, float]:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=ids, labels=labels).loss
        forward_done = time.perf_counter()
        loss.backward()
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (
            forward_done - started,
            backward_done - forward_done,
            time.perf_counter() - backward_done,
        )

    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    step()
    parts = [statistics.median(p) for p in zip(*(step() for _ in range(4)), strict=True)]
    seconds = sum(parts)
    flops = 6.0 * model.num_parameters() * batch * length
    return {
        "variant": variant,
        "forward_s": parts[0],
        "backward_s": parts[1],
        "optimizer_s": parts[2],
        "step_s": seconds,
        "first_step_s": first,
        "tokens_per_s": batch * length / seconds,
        "gflops": flops / seconds / 1e9,
    }


def operator_shares(folder: str, batch: int, length: int) -> list[tuple[str, float]]:
    """The recipe's step (bf16 autocast, eager attention, fused AdamW) by operator: each
    operator's share of the step's own CPU time, largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    labels = ids.clone()
    labels[:, : length // 2] = -100

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events)
    return sorted(((k, t / total) for k, t in events), key=lambda kv: -kv[1])


def main() -> None:
    from bench.memory import smollm2_tokenizer
    from tasks.efficiency import matmul_peak_flops

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    _, folder = smollm2_tokenizer()
    peak = matmul_peak_flops(dtype="bfloat16") / 1e9
    print(f"bf16 matmul peak {peak:.0f} GFLOP/s; batch {args.batch} x {args.length} tokens")
    for variant in args.variants:
        row = step_parts(folder, variant, args.batch, args.length)
        print(
            f"{variant:38s} forward {row['forward_s']:.3f} s  backward {row['backward_s']:.3f} s  "
            f"optimizer {row['optimizer_s']:.3f} s  step {row['step_s']:.3f} s  "
            f"{row['tokens_per_s']:.0f} tokens/s  {row['gflops']:.0f} GFLOP/s "
            f"(MFU {row['gflops'] / peak:.3f}; first step {row['first_step_s']:.1f} s)",
            flush=True,
        )
    print("the recipe's step by operator (share of its CPU time):")
    for name, share in operator_shares(folder, args.batch, args.length)[:12]:
        print(f"  {name:40s} {share:6.1%}")


if __name__ == "__main__":
    main()
