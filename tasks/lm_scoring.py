"""How a language model's answers are scored: by likelihood over a closed set of answers, by what
it generates (with a length budget read from the data), by overlap with the reference (ROUGE-L),
and on general text it was not tuned on (what it forgot).

Shared by the kinds that score a causal LM (``causal-lm``, ``sft``); torch and transformers load in
the functions that use them.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.metrics import gate_statistic, paired_interval
from tasks.threads import THREADS

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# eval.max_new_tokens: auto is the 95th percentile of the training answers' tokens, with room to
# spare (a 25% margin plus a few tokens for the end-of-turn marker), never above the cap.
AUTO_QUANTILE = 95
AUTO_MARGIN = 1.25
AUTO_EXTRA = 4
AUTO_CAP = 512
MAX_LABELS = 20  # more distinct answers than this: open-ended, not a closed set


def answer_budget(
    setting: int | str, tokenizer: PreTrainedTokenizerBase, answers: Sequence[str]
) -> tuple[int, str]:
    """(max new tokens, why): the configured number, or for ``auto`` enough for the answers."""
    if setting != "auto":
        return int(setting), "eval.max_new_tokens"
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers] or [16]
    p95 = float(np.percentile(lengths, AUTO_QUANTILE))
    budget = min(AUTO_CAP, math.ceil(p95 * AUTO_MARGIN) + AUTO_EXTRA)
    return budget, (
        f"auto: 95th percentile of the training answers {p95:.0f} tokens, x{AUTO_MARGIN} + "
        f"{AUTO_EXTRA}, capped at {AUTO_CAP}"
    )


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int,
    max_new_tokens: int,
) -> tuple[list[str], np.ndarray]:
    """Greedy answers to rendered prompts, and which of them hit ``max_new_tokens`` unfinished.

    Batched by similar length (little padding), left-padded; a batch stops when all its rows have
    ended; answers come back in the prompts' order.
    """
    import torch

    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stops = stop_ids(model, tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    answers: list[str] = [""] * len(prompts)
    capped = np.zeros(len(prompts), dtype=bool)
    for start in range(0, len(order), batch_size):
        THREADS.refit()  # another job may have started or ended
        rows = order[start : start + batch_size]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        batch = {k: v.to(model.device) for k, v in padded.items()}
        with torch.inference_mode():
            out = model.generate(  # type: ignore[operator]
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        for i, ids in zip(rows, new, strict=True):
            tokens = ids.tolist()
            capped[int(i)] = len(tokens) >= max_new_tokens and not stops & set(tokens)
            answers[int(i)] = str(tokenizer.decode(ids, skip_special_tokens=True)).strip()
    return answers, capped


def continuation(
    tokenizer: PreTrainedTokenizerBase, prompt: str, full: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) of ``full``, which starts with ``prompt``.

    The whole text is tokenized once and split where the prompt's tokens end, so a candidate is
    scored in the tokens the model would read; where the tokenizer merges across the boundary the
    continuation is tokenized on its own.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids) :]
    return prompt_ids, tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares (a system prompt, an instruction), leaving at
    least one token of each prompt to run per row."""
    if not prompts:
        return 0
    first, shortest = prompts[0], min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


@functools.lru_cache(maxsize=64)
def _forward_takes(model_class: Any, name: str) -> bool:  # Any: a model class, hashable
    return name in inspect.signature(model_class.forward).parameters


def forward_takes(model: PreTrainedModel, name: str) -> bool:
    """Whether the model's ``forward`` has the keyword ``name`` (``logits_to_keep``, ``cache``),
    looked up once per model class."""
    model_class: Any = type(model)
    return _forward_takes(model_class, name)


def _cached_forward(model: PreTrainedModel, **inputs: Any) -> tuple[Any, Any]:
    """(logits, KV cache) of a forward pass, whichever name this transformers gives the cache."""
    cache_kw = "cache" if forward_takes(model, "cache") else None
    if "past" in inputs:  # the cache to continue from
        inputs[cache_kw or "past_key_values"] = inputs.pop("past")
    out = model(**inputs, use_cache=True)
    return out.logits, (out.cache if cache_kw else out.past_key_values)


def choice_loglikelihoods(
    model: PreTrainedModel,
    prompts: list[list[int]],
    choices: list[list[list[int]]],
    batch_size: int,
    pad_token_id: int,
) -> np.ndarray:
    """Summed log-probability of every candidate continuation after its prompt: ``[rows, K]``
    (see :func:`score_prompts`)."""
    return score_prompts(model, prompts, choices, batch_size, pad_token_id).scores


@dataclass
class PromptScores:
    """What one pass over the prompts gave: candidate log-likelihoods and greedy answers."""

    scores: np.ndarray  # [rows, K] summed log-probability of each candidate continuation
    answers: dict[int, list[int]]  # row -> greedy answer tokens (the rows asked to decode)
    capped: dict[int, bool]  # row -> the answer hit max_new_tokens before a stop token


def score_prompts(
    model: PreTrainedModel,
    prompts: list[list[int]],
    choices: list[list[list[int]]],
    batch_size: int,
    pad_token_id: int,
    decode: Sequence[bool] | None = None,
    max_new_tokens: int = 0,
    stops: set[int] | None = None,
) -> PromptScores:
    """Score candidate continuations of every prompt and decode greedy answers, each prompt
    computed once.

    lm-evaluation-harness's multiple-choice scoring: the tokens all prompts share run once per
    batch, each row's own tokens run on top of that cache (rows are padded between the shared
    prefix and their own tokens, with positions that skip the padding, so every row reads exactly
    its prompt), the cache is repeated for the K candidates, and the candidates run as one batch
    on top of it. The first candidate token is scored from the prompt's last logits, each later one
    from the candidate's own previous position. Rows flagged in ``decode`` also answer greedily
    from a copy of the same cache, one token per step, until each has emitted a stop token or
    ``max_new_tokens`` (a row that finished is carried along, its tokens ignored).
    """
    import copy

    import torch

    model.eval()
    device = next(model.parameters()).device
    k = len(choices[0])
    scores = np.zeros((len(prompts), k))
    answers: dict[int, list[int]] = {}
    capped: dict[int, bool] = {}
    flags = list(decode) if decode is not None else [False] * len(prompts)
    n_shared = shared_prefix(prompts)
    keep_last = forward_takes(model, "logits_to_keep")
    order = np.argsort([len(p) for p in prompts], kind="stable")  # batches of similar length
    for start in range(0, len(prompts), batch_size):
        THREADS.refit()  # another job may have started or ended
        rows = order[start : start + batch_size].tolist()
        own = [prompts[r][n_shared:] for r in rows]
        width = max(len(o) for o in own)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, o in enumerate(own):  # left-padded: every prompt ends at the right edge
            ids[j, width - len(o) :] = torch.as_tensor(o)
            mask[j, width - len(o) :] = 1
        cands = [choices[r][c] for r in rows for c in range(k)]
        length = max(len(c) for c in cands)
        cand_ids = torch.full((len(cands), length), pad_token_id, dtype=torch.long)
        cand_mask = torch.zeros((len(cands), length), dtype=torch.long)
        for j, c in enumerate(cands):
            cand_ids[j, : len(c)] = torch.as_tensor(c)
            cand_mask[j, : len(c)] = 1
        with torch.inference_mode():
            inputs: dict[str, Any] = {"logits_to_keep": 1} if keep_last else {}
            if n_shared:
                _, cache = _cached_forward(
                    model, input_ids=torch.as_tensor([prompts[rows[0]][:n_shared]]).to(device)
                )
                cache.batch_repeat_interleave(len(rows))
                inputs["past"] = cache
            mask = torch.cat([torch.ones((len(rows), n_shared), dtype=torch.long), mask], 1)
            positions = (mask.cumsum(1) - 1).clamp(min=0)[:, n_shared:]
            logits, cache = _cached_forward(
                model,
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                **inputs,
            )
            last = logits[:, -1].float()
            wanted = [j for j, r in enumerate(rows) if flags[r]]
            if wanted and max_new_tokens:
                tokens, hit = _greedy(
                    model, copy.deepcopy(cache), last, mask, wanted, max_new_tokens, stops or set()
                )
                for j, row_tokens, row_hit in zip(wanted, tokens, hit, strict=True):
                    answers[rows[j]], capped[rows[j]] = row_tokens, row_hit
            cache.batch_repeat_interleave(k)
            first = torch.log_softmax(last, -1).repeat_interleave(k, 0)
            ends = mask.sum(1).repeat_interleave(k).unsqueeze(1)
            later, _ = _cached_forward(
                model,
                input_ids=cand_ids.to(device),
                attention_mask=torch.cat([mask.repeat_interleave(k, 0), cand_mask], 1).to(device),
                position_ids=(ends + torch.arange(length)).to(device),
                past=cache,
            )
            logp = torch.cat([first.unsqueeze(1), torch.log_softmax(later[:, :-1].float(), -1)], 1)
            picked = logp.gather(2, cand_ids.to(device).unsqueeze(2)).squeeze(2).cpu()
        total = (picked * cand_mask).sum(1).view(len(rows), k)
        scores[rows] = total.double().numpy()
    return PromptScores(scores, answers, capped)


def _greedy(
    model: PreTrainedModel,
    cache: Any,
    last: torch.Tensor,
    mask: torch.Tensor,
    wanted: list[int],
    max_new_tokens: int,
    stops: set[int],
) -> tuple[list[list[int]], list[bool]]:
    """Greedy answers of the ``wanted`` rows of a prompt batch, from its cache and last logits."""
    import torch

    device = last.device
    index = torch.as_tensor(wanted)
    cache.batch_select_indices(index.to(device))
    mask = mask[index].to(device)
    step = last[index].argmax(-1)
    tokens: list[list[int]] = [[] for _ in wanted]
    done = [False] * len(wanted)
    keep_last = forward_takes(model, "logits_to_keep")
    for n in range(max_new_tokens):
        for j, t in enumerate(step.tolist()):
            if not done[j]:
                tokens[j].append(t)
                done[j] = t in stops
        if all(done) or n == max_new_tokens - 1:
            break
        position = mask.sum(1, keepdim=True)  # real tokens so far: the next one's position
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits, cache = _cached_forward(
            model,
            input_ids=step.unsqueeze(1),
            attention_mask=mask,
            position_ids=position,
            past=cache,
            **({"logits_to_keep": 1} if keep_last else {}),
        )
        step = logits[:, -1].float().argmax(-1)
    return tokens, [not d for d in done]


def rouge_l(references: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """Per-example ROUGE-L F-measure (``rouge-score``, its default tokenizer, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return np.asarray(
        [
            scorer.score(r, p)["rougeL"].fmeasure
            for r, p in zip(references, predictions, strict=True)
        ],
        dtype=float,
    )


def general_blocks(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int, blocks: int
) -> Dataset:
    """General text as blocks of ``block_size`` tokens, every token a target: documents joined by
    the EOS token, cut into blocks, the first ``blocks`` kept (the same ones for every model)."""
    from datasets import Dataset

    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(str(text), add_special_tokens=False)["input_ids"] + [separator]
        if len(stream) >= block_size * blocks:
            break
    cut = [stream[i : i + block_size] for i in range(0, len(stream), block_size)][:blocks]
    cut = [b for b in cut if len(b) > 1]
    return Dataset.from_dict(
        {"input_ids": cut, "attention_mask": [[1] * len(b) for b in cut], "labels": cut}
    )


def read_general_texts(source: str, column: str) -> list[str]:
    """The texts of ``eval.general_text`` (any source the data readers read, ``.txt`` by
    paragraph), from ``column``.

    Raises:
        ValueError: naming the source and the columns it has when ``column`` is missing.
    """
    from tasks.sources import read_table

    frame = read_table(source, documents="paragraph").frame
    if column not in frame.columns:
        raise ValueError(
            f"eval.general_text {source}: no column {column!r} (columns found: "
            f"{list(frame.columns)[:10]}); set eval.general_text_column"
        )
    texts = [str(t) for t in frame[column].tolist() if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"eval.general_text {source}: column {column!r} holds no text")
    return texts


GENERAL_FILE = "general_losses.json"  # per-block general-text losses, before and after


def record_general(
    workdir: Path, after: tuple[np.ndarray, np.ndarray], before: tuple[np.ndarray, np.ndarray]
) -> tuple[str, dict[str, float]]:
    """Write the per-block general-text losses of the fine-tuned (``after``) and the base model
    (``before``) for the gate; return the file and its summary (perplexity before and after)."""
    path = workdir / GENERAL_FILE
    path.write_text(
        json.dumps(
            {
                "after": {"sums": to_list(after[0]), "counts": to_list(after[1])},
                "before": {"sums": to_list(before[0]), "counts": to_list(before[1])},
            }
        )
    )

    def ppl(sums: np.ndarray, counts: np.ndarray) -> float:
        return math.exp(min(mean_loss(sums, counts), 700.0))

    return str(path), {
        "perplexity_before": ppl(*before),
        "perplexity_after": ppl(*after),
        "rise": ppl(*after) / ppl(*before) - 1.0,
        "blocks": float(len(after[0])),
    }


def read_general(path: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(after, before) per-block losses as :func:`record_general` wrote them."""
    logged = json.loads(Path(path).read_text())
    return tuple(  # type: ignore[return-value]
        (np.asarray(logged[k]["sums"]), np.asarray(logged[k]["counts"]))
        for k in ("after", "before")
    )


def loss_rise(
    after: tuple[np.ndarray, np.ndarray],
    before: tuple[np.ndarray, np.ndarray],
    samples: int,
    seed: int,
) -> tuple[float, float, float]:
    """Relative rise of perplexity from ``before`` to ``after`` (per-block loss sums and token
    counts, the same blocks), with its paired bootstrap 95% CI: (rise, low, high)."""

    def rise(sa: np.ndarray, ca: np.ndarray, sb: np.ndarray, cb: np.ndarray) -> float:
        return float(math.expm1(mean_loss(sa, ca) - mean_loss(sb, cb)))

    return paired_interval((*after, *before), rise, samples, seed)


def to_list(values: np.ndarray | torch.Tensor | list[Any]) -> list[Any]:
    """A JSON-ready list of numbers."""
    return np.asarray(values).tolist()


# --- judging answers ---------------------------------------------------------------------


def normalise_answer(text: str) -> str:
    """Case, accents, surrounding punctuation and whitespace removed: what exact match compares."""
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .,:;!?\"'`()[]{}*")


def closed_set(answers: list[str], declared: list[str] | None) -> list[str]:
    """The answers' label set: declared, or the distinct training answers when few; else empty."""
    if declared:
        return list(declared)
    distinct = sorted({normalise_answer(a) for a in answers})
    return distinct if len(distinct) <= MAX_LABELS and len(answers) >= 2 * len(distinct) else []


def label_of(answer: str, labels: list[str]) -> int:
    """The label an answer gives: itself after normalisation, else the one label it names as a
    word ("The sentiment is negative." gives negative); -1 when it names none or several.

    A verbose zero-shot answer is read for its label rather than failed for its wording, so the
    yardstick is fair; exact match stays strict.
    """
    normalised = [normalise_answer(label) for label in labels]
    text = normalise_answer(answer)
    if text in normalised:
        return normalised.index(text)
    named = [i for i, label in enumerate(normalised) if re.search(rf"\b{re.escape(label)}\b", text)]
    return named[0] if len(named) == 1 else -1


def label_ids(answers: list[str], labels: list[str]) -> np.ndarray:
    """Each answer's index in ``labels`` (see :func:`label_of`), or -1 outside the set."""
    return np.asarray([label_of(a, labels) for a in answers], dtype=int)


def mean_loss(sums: np.ndarray, counts: np.ndarray) -> float:
    """The gate's statistic: mean next-token loss over the predicted tokens of the rows given."""
    return float(sums.sum() / max(float(counts.sum()), 1.0))


def metric_columns(
    logged: dict[str, Any], scores: dict[str, Any], metric: str
) -> tuple[tuple[np.ndarray, ...], Callable[..., float], bool]:
    """(per-row columns, statistic, higher is better) of one model's logged scores."""
    labels = logged["labels"]
    if metric in ("accuracy", "macro_f1"):
        if not labels:
            raise ValueError(
                f"promote.metric {metric} needs answers from a closed set (data.labels, or at most "
                f"{MAX_LABELS} distinct training answers)"
            )
        truth = label_ids(logged["references"], labels)
        return (truth, np.asarray(scores["picked"])), gate_statistic(metric, len(labels)), True
    if metric == "answer_loss":
        return (np.asarray(scores["sums"]), np.asarray(scores["counts"])), mean_loss, False
    references = [logged["references"][i] for i in logged["generated"]]
    if metric == "rouge_l":
        values = rouge_l(references, scores["answers"])
    else:
        values = np.asarray(
            [
                normalise_answer(r) == normalise_answer(a)
                for r, a in zip(references, scores["answers"], strict=True)
            ],
            dtype=float,
        )
    return (values,), lambda x: float(np.mean(x)), True
