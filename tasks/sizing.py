"""Settings left at ``auto``, sized to the data and the model, each with the reason it was chosen.

The built-in defaults are not one data set's choices: the max length follows the training texts'
token lengths, long texts keep their head and tail, warm-up follows the run's length and the model's
size, and a time budget turns into a number of steps from measured throughput. Every function here
is pure and returns ``(value, reason)``; the flow logs the reasons to the run.
"""

from __future__ import annotations

import math
import re

import numpy as np

from tasks.config import TrainConfig

COVERAGE = 0.95  # `max_length: auto` fits this share of the training texts
LM_BLOCK = 256  # `max_length: auto` for causal-lm: the block size texts are packed into
HEAD_TAIL_ABOVE = 0.10  # `truncation: auto` keeps head and tail when more texts than this are cut
HEAD_SHARE = 0.25  # head+tail: the first quarter of the budget, then the last three quarters
MAX_BUDGET_EPOCHS = 20  # a time budget on tiny data stops here (early stopping usually sooner)
# What a step costs beyond its forward and backward pass (the optimizer update, clipping, logging):
# the probe times only the passes (the measurement behind 1.25 is in docs/benchmarks.md). The
# budget guard stops training at the budget whatever the estimate.
STEP_OVERHEAD = 1.25
# What a time budget keeps back for registration: the model written, copied into the artifact
# store and read back (three passes over its bytes at DISK_BYTES_PER_S), and SAVE_S for the rest.
SAVE_S = 5.0
DISK_BYTES_PER_S = 200e6


def size_max_length(lengths: np.ndarray, limit: int, task: str) -> tuple[int, str]:
    """The token budget per example: cover ``COVERAGE`` of the training texts, within ``limit``."""
    if task == "causal-lm":
        value = min(LM_BLOCK, limit)
        return value, f"causal-lm packs text into blocks of {value} tokens (model limit {limit})"
    if lengths.size == 0:
        return min(128, limit), "no token counts: 128"
    covering = math.ceil(float(np.quantile(lengths, COVERAGE)))
    value = max(8, min(covering, limit))
    reason = (
        f"{COVERAGE:.0%} of {lengths.size} training texts fit in {covering} tokens "
        f"(median {int(np.median(lengths))}, longest {int(lengths.max())})"
    )
    if covering > limit:
        reason += f"; capped at the model's limit of {limit}"
    return value, reason


def cut_share(lengths: np.ndarray, max_length: int) -> float:
    """The share of texts longer than ``max_length`` tokens."""
    return float((lengths > max_length).mean()) if lengths.size else 0.0


def choose_truncation(setting: str, lengths: np.ndarray, max_length: int) -> tuple[str, str]:
    """``head`` or ``head+tail``: ``auto`` keeps the tail too when many texts would be cut."""
    share = cut_share(lengths, max_length)
    if setting != "auto":
        return setting, f"set in the config ({share:.1%} of training texts are cut)"
    if share > HEAD_TAIL_ABOVE:
        return "head+tail", (
            f"{share:.1%} of training texts exceed {max_length} tokens (over "
            f"{HEAD_TAIL_ABOVE:.0%}): keep their first quarter and last three quarters"
        )
    return "head", f"{share:.1%} of training texts exceed {max_length} tokens"


def head_tail(ids: list[int], max_length: int) -> list[int]:
    """The first ``HEAD_SHARE`` and the last tokens of ``ids``, ``max_length`` in all.

    Special tokens survive: a [CLS] opens the head, a [SEP] closes the tail.
    """
    if len(ids) <= max_length:
        return ids
    head = max(1, int(max_length * HEAD_SHARE))
    return ids[:head] + ids[len(ids) - (max_length - head) :]


def auto_warmup(setting: float | str, total_steps: int, n_params: int) -> tuple[float, str]:
    """The warm-up share: longer for short runs, shorter for very large models."""
    if setting != "auto":
        return float(setting), "set in the config"
    if n_params > 1e9:
        return 0.03, f"3% for a model of {n_params / 1e9:.1f}B parameters"
    if total_steps < 1000:
        return 0.10, f"10% of a short run ({total_steps} steps): small data fine-tunes more stably"
    return 0.06, f"6% of {total_steps} steps"


def plan_budget(
    budget_s: float,
    step_s: float,
    eval_s: float,
    steps_per_epoch: int,
    evals_per_epoch: float = 1.0,
) -> tuple[int, str]:
    """Optimizer steps that fill ``budget_s``: each step costs ``step_s`` and each of the
    ``evals_per_epoch`` validations per epoch costs ``eval_s``. At least one step, at most
    ``MAX_BUDGET_EPOCHS`` epochs."""
    per_step = step_s * STEP_OVERHEAD + eval_s * evals_per_epoch / max(1, steps_per_epoch)
    steps = max(1, int(budget_s / per_step))
    cap = MAX_BUDGET_EPOCHS * steps_per_epoch
    reason = (
        f"{budget_s:.0f} s budget / ({step_s:.3f} s per step x {STEP_OVERHEAD} + {eval_s:.2f} s "
        "per validation "
        f"every {steps_per_epoch / evals_per_epoch:.0f} steps) = {steps} steps"
    )
    if steps > cap:
        steps = cap
        reason += f"; capped at {MAX_BUDGET_EPOCHS} epochs ({cap} steps)"
    return steps, reason


def revise_budget(
    left_s: float, step_s: float, validation_s: float, validate_every: float, done: int, cap: int
) -> int:
    """The step count that fills what is left of a budget, from measured costs: ``done`` steps
    taken, ``left_s`` seconds left for training, each further step ``step_s`` and a validation
    (``validation_s``) every ``validate_every`` steps. At least one more step, at most ``cap``."""
    per_step = step_s + validation_s / max(validate_every, 1.0)
    return min(cap, done + max(1, int(max(left_s, 0.0) / per_step)))


SHIFT_KS = 0.2  # a length distribution this far from training's (Kolmogorov-Smirnov) is a shift
SHIFT_COVERAGE = 0.05  # test words this much less covered by training's vocabulary is a shift
_WORD = re.compile(r"\w+")


def _words(texts: list[str]) -> list[str]:
    return [w for t in texts for w in _WORD.findall(t.lower())]


def coverage(vocabulary: set[str], words: list[str]) -> float:
    """The share of ``words`` (running words, not types) found in ``vocabulary``."""
    return sum(w in vocabulary for w in words) / len(words) if words else 1.0


def distribution_shift(
    train_lengths: np.ndarray,
    test_lengths: np.ndarray,
    train_texts: list[str],
    test_texts: list[str],
    seed: int = 0,
) -> tuple[dict[str, float], str | None]:
    """How far the test file is from the training data a validation split would be carved from.

    Compares token lengths (two-sample KS statistic, medians) and vocabulary: the share of test
    words seen in training, against the same share for a held-out tenth of training (what a
    carved validation split sees). Returns the figures and a warning when they differ.
    """
    from scipy.stats import ks_2samp

    ks = float(ks_2samp(train_lengths, test_lengths).statistic) if test_lengths.size else 0.0
    order = np.random.default_rng(seed).permutation(len(train_texts))
    held = max(1, len(order) // 10)
    held_out = [train_texts[i] for i in order[:held]]
    rest = {w for i in order[held:] for w in _WORD.findall(train_texts[i].lower())}
    vocabulary = rest | set(_words(held_out))
    figures = {
        "shift/length_ks": ks,
        "shift/median_tokens_train": float(np.median(train_lengths)) if train_lengths.size else 0,
        "shift/median_tokens_test": float(np.median(test_lengths)) if test_lengths.size else 0,
        "shift/vocab_coverage_validation": coverage(rest, _words(held_out)),
        "shift/vocab_coverage_test": coverage(vocabulary, _words(test_texts)),
    }
    seen_val = figures["shift/vocab_coverage_validation"]
    seen_test = figures["shift/vocab_coverage_test"]
    if ks <= SHIFT_KS and seen_val - seen_test <= SHIFT_COVERAGE:
        return figures, None
    return figures, (
        "the test data differs from the training data the validation split is carved from: "
        f"token lengths KS {ks:.2f} (median {figures['shift/median_tokens_train']:.0f} vs "
        f"{figures['shift/median_tokens_test']:.0f} tokens), test words seen in training "
        f"{seen_test:.1%} vs {seen_val:.1%} for held-out training rows. Validation scores may "
        "be optimistic about test; give "
        "data.validation rows that resemble the test data to select on them instead."
    )


# The `auto` schedule: enough optimizer steps to adapt, few enough epochs not to memorise.
TARGET_STEPS = 300
MIN_EPOCHS, MAX_EPOCHS = 2, 10
# The `auto` learning rate: 1e-4 for a ~25M-parameter encoder, scaled by 1/sqrt(size), so BERT-base
# (110M) gets ~5e-5 and BERT-large (335M) ~3e-5, the usual values for those models.
REFERENCE_PARAMS, REFERENCE_LR = 25e6, 1e-4


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Rows per optimizer step: ``batch_size`` is per process, so all processes count."""
    return cfg.batch_size * cfg.gradient_accumulation_steps * world_size


def steps_per_epoch(cfg: TrainConfig, train_rows: int, world_size: int) -> int:
    """Optimizer steps in one pass over ``train_rows`` (at least one)."""
    return max(1, math.ceil(train_rows / global_batch(cfg, world_size)))


def auto_schedule(
    cfg: TrainConfig, train_rows: int, n_params: int, processes: int
) -> tuple[float, float]:
    """(epochs, learning rate), resolving ``auto`` from the data size and the model size.

    Epochs: enough for about ``TARGET_STEPS`` optimizer steps of the global batch (all
    ``processes`` together), clamped to [2, 10]: 600 rows at batch 32 get 10 epochs, 35,000 rows
    get 2. Early stopping and best-checkpoint selection make the upper end safe. Learning rate:
    ``1e-4 * sqrt(25M / params)``, clamped to [1e-5, 2e-4].
    """
    epochs = cfg.epochs
    if epochs == "auto":
        per_epoch = steps_per_epoch(cfg, train_rows, processes)
        epochs = float(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / per_epoch))))
    lr = cfg.learning_rate
    if lr == "auto":
        lr = float(np.clip(REFERENCE_LR * math.sqrt(REFERENCE_PARAMS / n_params), 1e-5, 2e-4))
    return float(epochs), float(lr)
