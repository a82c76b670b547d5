"""Supervised fine-tuning (SFT) of a causal LM on instruction or chat data.

Each row becomes a conversation (``{role, content}`` messages) from one of four formats: chat,
prompt/completion, alpaca, or a labelled text table turned into instructions. The conversation is
rendered with the tokenizer's own chat template; the loss is on the assistant answers only (every
assistant turn, each ending with the template's end-of-turn token, so the model learns to stop),
unless ``model.train_on_prompt``. With ``model.packing`` a batch's conversations share one row
without padding and with positions restarting per conversation, from which transformers builds a
block-diagonal attention mask: no conversation attends to another.

The model is judged against the untouched pretrained model (zero-shot) on the same held-out rows,
from one pass over each prompt (:func:`tasks.lm_scoring.score_prompts`): the answer-only loss of
every reference answer; over a closed answer set, the most likely answer (lm-evaluation-harness's
multiple-choice scoring); the greedy answer, judged by exact match, ROUGE-L and the label it names.
A classical baseline (TF-IDF + logistic regression over the closed set, else the most frequent
answer) stands beside them. The gate decides on the likelihood accuracy over a closed set, else on
the answer loss; general-text perplexity before and after measures what was forgotten.

Why not TRL's ``SFTTrainer``: its ``assistant_only_loss`` needs a chat template with
``{% generation %}`` markers, which most shipped templates (SmolLM2's among them) lack, and its
data preparation and trainer would replace the shared recipe's samplers, resume and telemetry.
The masking here works with any template: each assistant turn's span is found by rendering the
conversation up to that turn, which is the same rule TRL applies to prompt/completion data.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature

from tasks.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from tasks.kinds.causal_lm import (
    IGNORE,
    block_losses,
    perplexity,
    setup_model,
    validation_perplexity,
    vocabulary_identity,
)
from tasks.lm_scoring import (
    answer_budget,
    closed_set,
    continuation,
    general_blocks,
    label_ids,
    metric_columns,
    normalise_answer,
    read_general_texts,
    record_general,
    rouge_l,
    score_prompts,
    stop_ids,
    to_list,
)
from tasks.metrics import classification_metrics, tfidf_baseline
from tasks.results import (
    Checked,
    EvalResult,
    Evidence,
    InputExample,
    Prepared,
    Splits,
    TrainExtras,
)
from tasks.sources import fingerprint

# torch, transformers' models and datasets load where they are used: the data contract (the first
# stage) needs none of them, and importing them takes seconds.
if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        Trainer,
    )
    from transformers.modeling_outputs import ModelOutput

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": ..., "content": ...}
Conversation = list[Message]
ROLES = ("system", "user", "assistant")
ANSWERS_FILE = "test_answers.json"  # per-row references and generations, logged for the gate


# --- rows -> conversations -------------------------------------------------------------------


def detect_format(columns: list[str], cfg: DataConfig) -> str:
    """The configured format, or for ``auto`` the first whose columns the table has."""
    if cfg.format != "auto":
        return cfg.format
    candidates = [
        ("chat", [cfg.messages_column]),
        ("prompt-completion", [cfg.prompt_column, cfg.completion_column]),
        ("alpaca", [cfg.instruction_column, cfg.output_column]),
        ("labelled", [cfg.text_column, cfg.label_column]),
    ]
    for name, needed in candidates:
        if all(c in columns for c in needed):
            return name
    return "chat"  # nothing fits: the contract reports the missing messages column


def required_columns(fmt: str, cfg: DataConfig) -> list[str]:
    return {
        "chat": [cfg.messages_column],
        "prompt-completion": [cfg.prompt_column, cfg.completion_column],
        "alpaca": [cfg.instruction_column, cfg.output_column],
        "labelled": [cfg.text_column, cfg.label_column],
    }[fmt]


# Any: a raw table cell, of whatever type the source reader produced; typed once read.
def _messages(value: Any) -> Conversation:
    """A chat cell as a list of dicts: a list, a numpy array (Parquet) or a JSON string (CSV)."""
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError("not a list of {role, content} messages")
    return [{"role": m.get("role"), "content": m.get("content")} for m in value]


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def to_conversation(row: dict[str, Any], fmt: str, cfg: DataConfig) -> Conversation:  # raw row
    """One raw row as a conversation. Raises ValueError naming what is wrong with the row."""
    if fmt == "chat":
        messages = _messages(row[cfg.messages_column])
    elif fmt == "prompt-completion":
        prompt, completion = row[cfg.prompt_column], row[cfg.completion_column]
        if isinstance(prompt, (list, np.ndarray)) or isinstance(completion, (list, np.ndarray)):
            messages = _messages(prompt) + _messages(completion)  # conversational form
        else:
            messages = [
                {"role": "user", "content": _text(prompt)},
                {"role": "assistant", "content": _text(completion)},
            ]
    elif fmt == "alpaca":
        extra = _text(row.get(cfg.input_column))
        instruction = _text(row[cfg.instruction_column])
        if not instruction.strip():
            raise ValueError(f"the instruction ({cfg.instruction_column!r}) is empty or missing")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row[cfg.output_column])},
        ]
    else:  # labelled
        messages = [
            {
                "role": "user",
                "content": cfg.prompt_template.format(text=_text(row[cfg.text_column])),
            },
            {"role": "assistant", "content": _text(row[cfg.label_column])},
        ]
    if cfg.system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    return messages


def roles_alternate(messages: Conversation) -> bool:
    """An optional system turn, then user and assistant turns alternating, ending on an answer."""
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return (
        len(roles) >= 2
        and len(roles) % 2 == 0
        and all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
    )


def prompt_key(messages: Conversation) -> str:
    """The prompt of a conversation (every turn but the final answer), as one comparable text.

    Duplicates and train/test leakage are judged on it: two rows asking the same thing are the
    same question, whatever their answers.
    """
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])


# --- the chat template -----------------------------------------------------------------------


def with_template(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer with ``model.chat_template`` when one is configured."""
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    return tokenizer


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, generation_prompt: bool
) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def answer_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it.

    A turn's span runs from the end of the prompt that asks for it (the conversation so far with
    the generation prompt) to the end of the conversation including it, so it holds the answer and
    the template's end-of-turn token. Raises ValueError when the template does not render each
    prefix as a prefix of the whole (then no answer can be located).
    """
    full = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            raise ValueError("the chat template does not render the conversation turn by turn")
        spans.append((len(before), len(upto)))
    return full, spans


def template_problem(messages: Conversation, text: str, spans: list[tuple[int, int]]) -> str:
    """What the rendered conversation lost ("" when every turn is where training will look)."""
    for m in messages:
        if m["content"].strip() and m["content"].strip() not in text:
            return f"the rendered conversation lacks the {m['role']} turn's text"
    answers = [m for m in messages if m["role"] == "assistant"]
    for m, (a, b) in zip(answers, spans, strict=True):
        if m["content"].strip() not in text[a:b]:
            return "an answer is rendered outside its assistant turn"
    return ""


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Conversation,
    max_length: int,
    train_on_prompt: bool,
) -> dict[str, Any]:
    """Token ids of the rendered conversation and its labels (-100 outside the answers)."""
    text, spans = answer_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = list(ids)
    if not train_on_prompt:
        in_answer = [
            any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]
        ]
        labels = [t if keep else IGNORE for t, keep in zip(ids, in_answer, strict=True)]
    return {
        "input_ids": ids[:max_length],
        "attention_mask": [1] * min(len(ids), max_length),
        "labels": labels[:max_length],
        "length": min(len(ids), max_length),
    }


# --- judging answers -------------------------------------------------------------------------


def answer_metrics(
    references: list[str], answers: list[str], labels: list[str]
) -> dict[str, float]:
    """Exact match; with a closed set, accuracy, macro F1 and the share of answers outside it."""
    exact = np.mean(
        [
            normalise_answer(r) == normalise_answer(a)
            for r, a in zip(references, answers, strict=True)
        ]
    )
    metrics = {"exact_match": float(exact)}
    if labels:
        y_true, y_pred = label_ids(references, labels), label_ids(answers, labels)
        scores = classification_metrics(y_true, y_pred, labels)
        metrics |= {k: scores[k] for k in ("accuracy", "macro_f1")}
        metrics |= {f"f1/{label}": scores[f"f1/{label}"] for label in labels}
        metrics["outside_label_set"] = float(np.mean(y_pred == -1))
    return metrics


class PackedRows:
    """Pack a batch's conversations into as few rows of ``row_length`` tokens as fit, no padding
    between them, and ask the model for logits only where an answer token follows.

    Each conversation keeps its own positions (``position_ids`` restart at 0), from which
    transformers builds a block-diagonal mask: no conversation attends to another, and a
    conversation's first token is never the target of the one before it. Rows of at most
    ``model.max_length`` (first fit, longest first) rather than one row for the whole batch keep
    the attention matrices small: on a CPU the masked attention over one long row computes every
    pair of positions, most of them masked out. Only the last row's tail is padding, a block of its
    own that nothing attends to and no loss reads.

    With the loss on answers only, a handful of positions per conversation predict a target; the
    others need no vocabulary projection. ``logits_to_keep`` (the positions, over all rows) makes
    the model project only those: for SmolLM2 (a 49k-token vocabulary, 576 wide) that saves about
    a sixth of the FLOPs per token. :func:`answer_loss` reads the kept logits back.
    """

    def __init__(self, row_length: int, pad_token_id: int) -> None:
        self.row_length = row_length
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        rows: list[list[dict[str, Any]]] = []
        used: list[int] = []
        for feature in sorted(features, key=lambda f: -len(f["input_ids"])):
            size = len(feature["input_ids"])
            fits = [r for r, n in enumerate(used) if n + size <= self.row_length]
            if fits:
                rows[fits[0]].append(feature)
                used[fits[0]] += size
            else:
                rows.append([feature])
                used.append(size)
        width = max(used)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            offset = 0
            for feature in row:
                size = len(feature["input_ids"])
                input_ids[r, offset : offset + size] = torch.as_tensor(feature["input_ids"])
                labels[r, offset : offset + size] = torch.as_tensor(feature["labels"])
                labels[r, offset] = IGNORE  # never predicted from the previous conversation
                positions[r, offset : offset + size] = torch.arange(size)
                offset += size
            positions[r, offset:] = torch.arange(width - offset)  # the tail: a block of its own
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": positions,
            "logits_to_keep": target_positions(labels),
        }


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions (in any row) whose next token is a target: where logits are needed."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero()[:, 0]


def answer_loss(
    outputs: ModelOutput, labels: torch.Tensor, num_items_in_batch: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy on the targets: from kept logits (packed training rows) or from
    full logits (padded scoring batches), summed over targets and divided as the model would."""
    import torch.nn.functional as F

    logits = outputs["logits"].float()
    if logits.shape[1] == labels.shape[1]:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = labels[:, target_positions(labels) + 1]
    vocabulary = logits.shape[-1]
    total = F.cross_entropy(
        logits.reshape(-1, vocabulary), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
    return total / count


class SFTEval(EvalResult):
    """The fine-tuned and the zero-shot model judged on the same rows, and a classical baseline."""

    labels: list[str]
    answer_loss: dict[str, float]  # answer-only loss/perplexity: fine-tuned and zero-shot
    samples: list[dict[str, Any]]
    tokenizer: str
    max_new_tokens: int
    max_new_tokens_reason: str
    max_length: int  # model.max_length the rows were scored at

    headline_keys: tuple[str, ...] = ("answer_loss",)
    baseline_names: tuple[str, str] = ("zero-shot model", "classical")

    def version_tags(self) -> dict[str, str]:
        tags = {"test.fingerprint": self.test_fingerprint, "test.tokenizer": self.tokenizer}
        return tags | {f"test.{k}": f"{v:.4f}" for k, v in self.metrics.items() if "/" not in k}

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {"evaluation/answers_table.json": self.samples}

    def details_markdown(self) -> str:
        loss = self.answer_loss
        capped = self.metrics.get("generation_capped", 0.0)
        rows = [
            f"Answer-only perplexity: {loss['perplexity']:.3f} fine-tuned, "
            f"{loss['zero_shot_perplexity']:.3f} zero-shot.",
            "",
            f"Generation: {int(self.metrics.get('generated_rows', 0))} of {self.test_rows} rows, "
            f"at most {self.max_new_tokens} new tokens ({self.max_new_tokens_reason}); "
            f"{capped:.1%} of the fine-tuned answers hit the cap.",
        ]
        if self.labels:
            rows += [
                "",
                "Closed answer set: accuracy and macro F1 are those of the most likely answer "
                "(summed log-probability of each candidate after the prompt, as "
                "lm-evaluation-harness scores multiple choice; `accuracy_norm` divides by the "
                "answer's length); `generated_accuracy` reads the label the greedy answer names.",
            ]
        rows += [
            "",
            "| prompt | reference | fine-tuned | zero-shot | loss | ROUGE-L |",
            "|---|---|---|---|---|---|",
        ]
        rows += [
            "| "
            + " | ".join(_cell(str(s[k])) for k in ("prompt", "reference", "answer", "zero_shot"))
            + f" | {s['answer_loss']:.3f} | {s['rouge_l']:.3f} |"
            for s in self.samples[:20]
        ]
        return "\n".join(rows)


def _cell(text: str, limit: int = 120) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return (text[: limit - 1] + "…" if len(text) > limit else text) or " "


def conversations_of(table: str | pd.DataFrame) -> list[Conversation]:
    """The conversations of a clean table (a split's parquet file, or the frame itself)."""
    frame = pd.read_parquet(table) if isinstance(table, str) else table
    return [json.loads(m) for m in frame["messages"]]


def scored_rows(rows: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Which held-out rows are judged: all, or a seeded subset of ``eval.max_test_samples``."""
    everyone = np.arange(rows)
    if max_samples is None or max_samples >= rows:
        return everyone
    return np.sort(np.random.default_rng(seed).choice(everyone, max_samples, False))


def classical_answers(
    train: list[Conversation], test_prompts: list[str], labels: list[str], seed: int
) -> list[str]:
    """TF-IDF + logistic regression over the closed set, or the most frequent training answer."""
    answers = [m[-1]["content"] for m in train]
    if not labels or not (label_ids(answers, labels) >= 0).any():
        common = pd.Series([normalise_answer(a) for a in answers]).mode()
        return [str(common.iloc[0])] * len(test_prompts)
    ids = label_ids(answers, labels)
    keep = ids >= 0
    texts = [prompt_key(m) for m, k in zip(train, keep, strict=True) if k]
    return [labels[i] for i in tfidf_baseline(texts, ids[keep].tolist(), test_prompts, seed)]


class SFT:
    """The instruction/chat SFT kind (see :class:`tasks.kinds.Kind`)."""

    task = "sft"
    pipeline_task = "text-generation"
    mlflow_task = "llm/v1/chat"  # OpenAI-style chat requests; the chat template goes with it
    headline, headline_higher = "exact_match", True
    # The first is a fallback: the evaluation names the default (a closed answer set or not).
    gate_metrics: tuple[str, ...] = (
        "answer_loss",
        "accuracy",
        "macro_f1",
        "exact_match",
        "rouge_l",
    )
    selection_metric = "loss"  # answer-only validation loss
    greater_is_better = False
    has_labels = False
    yardstick = "zero-shot model"  # the untouched starting model, as the gate's reason names it

    def signature(self) -> ModelSignature | None:
        return None  # MLflow's chat signature for llm/v1/chat

    def input_example(self, splits: Splits) -> InputExample:
        first = conversations_of(splits.test_path)[0]
        return {"messages": first[:-1]}

    # -- data --

    def columns(self, found: list[str], cfg: DataConfig) -> dict[str, str]:
        """The format's columns (data.format, or the first whose columns the table has)."""
        fields = {
            "chat": ["messages_column"],
            "prompt-completion": ["prompt_column", "completion_column"],
            "alpaca": ["instruction_column", "output_column"],
            "labelled": ["text_column", "label_column"],
        }[detect_format(found, cfg)]
        return {f"data.{field}": getattr(cfg, field) for field in fields}

    def derive(
        self, frame: pd.DataFrame, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
    ) -> pd.DataFrame:
        """The conversation of every row and what the contract checks about it (``_`` columns)."""
        fmt = detect_format(list(frame.columns), cfg)
        missing = [c for c in required_columns(fmt, cfg) if c not in frame.columns]
        rows = []
        for row in frame.to_dict("records"):
            rows.append(self._derive_row(row, fmt, cfg, tokenizer, missing))
        return pd.DataFrame(rows, index=frame.index)

    def _derive_row(
        self,
        row: dict[str, Any],
        fmt: str,
        cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase | None,
        missing: list[str],
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "_format_error": None,
            "_roles_known": True,
            "_alternates": True,
            "_answers_present": True,
            "_prompts_present": True,
            "_answer_in_labels": True,
            "_template_renders": True,
            "_n_tokens": 0,
            "_key_text": None,
            "_all_text": None,
            "_conversation": None,
        }
        if missing:
            out["_format_error"] = f"columns {missing} missing for format {fmt}"
            return out
        try:
            messages = to_conversation(row, fmt, cfg)
        except (ValueError, KeyError, TypeError) as err:
            out["_format_error"] = f"{fmt}: {err}"
            return out
        contents = [m["content"] for m in messages]
        out["_roles_known"] = all(m["role"] in ROLES for m in messages)
        out["_alternates"] = roles_alternate(messages)
        out["_prompts_present"] = all(
            isinstance(m["content"], str) and m["content"].strip()
            for m in messages
            if m["role"] == "user"
        )
        out["_answers_present"] = all(
            isinstance(m["content"], str) and m["content"].strip()
            for m in messages
            if m["role"] == "assistant"
        )
        if cfg.labels and isinstance(messages[-1]["content"], str):
            # A declared answer set: the final answer must be one of its labels.
            allowed = {normalise_answer(label) for label in cfg.labels}
            out["_answer_in_labels"] = normalise_answer(messages[-1]["content"]) in allowed
        if not all(isinstance(c, str) for c in contents):
            out["_format_error"] = "a message content is not text"
            return out
        out["_key_text"] = prompt_key(messages)
        out["_all_text"] = "\n".join(contents)
        out["_conversation"] = json.dumps(messages, ensure_ascii=False)
        if tokenizer is not None and out["_roles_known"] and out["_alternates"]:
            try:
                text, spans = answer_spans(tokenizer, messages)
                out["_template_renders"] = template_problem(messages, text, spans) or True
                out["_n_tokens"] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            except Exception as err:  # a template raises whatever Jinja raises
                out["_template_renders"] = f"the template raises {type(err).__name__}: {err}"[:300]
        return out

    def normalise(self, frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
        """The clean table: the prompt (``text``), the conversation (JSON) and, for labelled
        data, the label (so the split is stratified as the classifier's is)."""
        table = pd.DataFrame(
            {"text": frame["_key_text"].to_numpy(), "messages": frame["_conversation"].to_numpy()}
        )
        if detect_format(list(frame.columns), cfg) == "labelled":
            table["label"] = [_text(v) for v in frame[cfg.label_column]]
        return table

    # -- training --

    def encode(
        self,
        dataset: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        cfg: ModelConfig,
    ) -> Dataset:
        """Rendered conversations, truncated at ``max_length``, labels on the answers only."""
        tokenizer = with_template(tokenizer, cfg)

        def _encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            rows = [
                encode_conversation(tokenizer, json.loads(m), cfg.tokens(), cfg.train_on_prompt)
                for m in batch["messages"]
            ]
            return {key: [r[key] for r in rows] for key in rows[0]}

        return dataset.map(_encode, batched=True, remove_columns=dataset.column_names)

    def setup_model(self, cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
        return setup_model(cfg, labels)

    def collator(
        self, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, training: bool
    ) -> PackedRows | DataCollatorForSeq2Seq:
        """Training with packing: a batch's conversations in one row, no padding, positions
        restarting per conversation (the block-diagonal mask). Scoring: padded rows, whose
        attention stays small however large the evaluation batch."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if training and cfg.packing:
            return PackedRows(cfg.tokens(), int(tokenizer.pad_token_id))
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)

    def compute_metrics(self, labels: list[str]) -> None:
        return None  # selection uses the answer-only validation loss

    def train_extras(self, cfg: TrainConfig, train: Dataset, labels: list[str]) -> TrainExtras:
        """The loss that reads the kept logits of a packed row (and full ones when scoring)."""
        return TrainExtras(compute_loss_func=answer_loss)

    def check(
        self, trainer: Trainer, validation: Dataset, labels: list[str], train: Dataset
    ) -> Checked:
        """Answer-only validation loss and perplexity of the selected model."""
        return validation_perplexity(trainer, validation)

    # -- evaluation --

    def evaluation_tokens(self, prepared: Prepared) -> float:
        """The model and its base over the test rows (a closed set's candidates share their
        prompt's pass), the generated tokens, and the general text."""
        new = prepared.cfg.eval.max_new_tokens
        generated = prepared.scored_test_rows() * (new if isinstance(new, int) else 16)
        return 2.0 * prepared.scored_test_tokens() + generated + prepared.general_text_tokens()

    def evaluate(self, model_dir: str, prepared: Prepared, workdir: Path) -> SFTEval:
        """Judge the fine-tuned and the zero-shot model on the same held-out rows."""
        return self.judge_held_out(model_dir, prepared, workdir)[0]

    def judge_held_out(
        self, model_dir: str, prepared: Prepared, workdir: Path
    ) -> tuple[SFTEval, HeldOut]:
        """The evaluation, and the scores behind it (for kinds that judge more on the same rows).

        Every scored row: the answer-only loss of its reference answer and, over a closed answer
        set, the most likely answer. A seeded subset (``eval.generation_samples``): the greedy
        answer, judged by exact match, ROUGE-L and the label it names. With
        ``eval.general_text``: the perplexity of general text, before and after.
        """
        tokenized, labels, splits = prepared.tokenized, prepared.data.labels, prepared.splits
        model_cfg, cfg, seed = prepared.cfg.model, prepared.cfg.eval, prepared.cfg.train.seed
        from datasets import load_from_disk
        from transformers import AutoModelForCausalLM, AutoTokenizer

        conversations = conversations_of(splits.test_path)
        test = load_from_disk(tokenized.path)["test"]
        rows = scored_rows(len(conversations), cfg.max_test_samples, seed)
        test = test.select(rows.tolist())
        chosen = [conversations[i] for i in rows]
        generated = np.arange(len(chosen))
        if cfg.generation_samples is not None and cfg.generation_samples < len(generated):
            generated = np.sort(
                np.random.default_rng(seed + 1).choice(generated, cfg.generation_samples, False)
            )
        train = conversations_of(splits.train_path)
        closed = closed_set([m[-1]["content"] for m in train], labels or None)
        tokenizer = with_template(AutoTokenizer.from_pretrained(model_dir), model_cfg)
        budget, budget_reason = answer_budget(
            cfg.max_new_tokens, tokenizer, [m[-1]["content"] for m in train]
        )
        references = [m[-1]["content"] for m in chosen]
        question = Questions.of(tokenizer, chosen, generated, closed, model_cfg.tokens())
        general = (
            general_blocks(
                read_general_texts(cfg.general_text, cfg.general_text_column),
                tokenizer,
                model_cfg.tokens(),
                cfg.general_blocks,
            )
            if cfg.general_text
            else None
        )
        started = time.perf_counter()
        fine = question.judge(
            AutoModelForCausalLM.from_pretrained(model_dir), test, general, cfg.batch_size, budget
        )
        zero = question.judge(setup_model(model_cfg, []), test, general, cfg.batch_size, budget)
        scoring_s = time.perf_counter() - started
        classical = classical_answers(train, [prompt_key(m) for m in chosen], closed, seed)
        logged = {
            "labels": closed,
            "rows": rows.tolist(),
            "generated": generated.tolist(),
            "references": references,
            "classical": classical,
            "fine_tuned": fine.logged(),
            "zero_shot": zero.logged(),
        }
        scores_path = workdir / ANSWERS_FILE
        scores_path.write_text(json.dumps(logged, ensure_ascii=False))
        metric, reason = gate_metric(closed)
        fine_metrics, zero_metrics = (
            fine.metrics(references, generated, closed),
            zero.metrics(references, generated, closed),
        )
        general_path: str | None = None
        general_summary: dict[str, float] = {}
        if fine.general is not None and zero.general is not None:
            general_path, general_summary = record_general(workdir, fine.general, zero.general)
        samples = [
            {
                "prompt": chosen[i][-2]["content"],
                "reference": references[i],
                "answer": fine.answers[j],
                "zero_shot": zero.answers[j],
                "answer_loss": round(fine.row_loss(i), 4),
                "zero_shot_loss": round(zero.row_loss(i), 4),
                "rouge_l": round(float(fine.rouge[j]), 4),
            }
            | (
                {
                    "likely": closed[int(fine.picked[i])],
                    "zero_shot_likely": closed[int(zero.picked[i])],
                }
                if closed
                else {}
            )
            for j, i in enumerate(generated)
        ]
        evaluation = SFTEval(
            scoring_s=scoring_s,
            metrics=fine_metrics,
            baseline=zero_metrics,
            classical=answer_metrics(references, classical, closed),
            test_rows=len(chosen),
            test_fingerprint=fingerprint(pd.read_parquet(splits.test_path).iloc[rows]),
            scores_path=str(scores_path),
            labels=closed,
            answer_loss={
                "loss": fine_metrics["answer_loss"],
                "perplexity": fine_metrics["answer_perplexity"],
                "zero_shot_loss": zero_metrics["answer_loss"],
                "zero_shot_perplexity": zero_metrics["answer_perplexity"],
            },
            samples=samples,
            tokenizer=vocabulary_identity(tokenizer),
            max_new_tokens=budget,
            max_new_tokens_reason=budget_reason,
            max_length=model_cfg.tokens(),
            default_metric=metric,
            default_metric_reason=reason,
            general=general_summary,
            general_path=general_path,
            headline_keys=(
                ("accuracy", "macro_f1", "generated_accuracy", "outside_label_set", "answer_loss")
                if closed
                else ("answer_loss", "rouge_l", "exact_match", "generation_capped")
            ),
        )
        return evaluation, HeldOut(rows, question, fine, zero)

    def evidence(self, evaluation: EvalResult, metric: str) -> Evidence:
        """The challenger's per-row scores in ``metric``, with the zero-shot model's on the same
        rows as the yardstick the first version must beat with a paired bootstrap CI above 0."""
        logged = json.loads(Path(evaluation.scores_path).read_text())
        columns, statistic, higher = metric_columns(logged, logged["fine_tuned"], metric)
        zero_shot, _, _ = metric_columns(logged, logged["zero_shot"], metric)
        return Evidence(
            metric=metric,
            columns=columns,
            statistic=statistic,
            higher_is_better=higher,
            floors={},
            correct=(lambda y, p: y == p) if metric == "accuracy" else None,
            yardstick=(self.yardstick, zero_shot),
        )

    def champion_columns(
        self, champion: ModelVersion, evaluation: EvalResult, prepared: Prepared, metric: str
    ) -> tuple[tuple[np.ndarray, ...] | None, str | None, bool]:
        """The champion's scores on the same rows: logged by its own run, or scored again."""
        splits, tokenized = prepared.splits, prepared.tokenized
        batch_size = prepared.cfg.eval.batch_size
        from datasets import load_from_disk

        assert isinstance(evaluation, SFTEval)
        logged = json.loads(Path(evaluation.scores_path).read_text())
        if metric == "answer_loss" and champion.tags.get("test.tokenizer") != evaluation.tokenizer:
            return None, "the champion uses another tokenizer: its answer losses differ", False
        if champion.tags.get("test.fingerprint") == evaluation.test_fingerprint:
            try:
                path = MlflowClient().download_artifacts(
                    str(champion.run_id), f"evaluation/{ANSWERS_FILE}"
                )
                theirs = json.loads(Path(path).read_text())
                if (
                    theirs.get("rows") == logged["rows"]
                    and theirs.get("generated") == logged["generated"]
                    and theirs.get("labels") == logged["labels"]
                ):
                    columns, _, _ = metric_columns(logged, theirs["fine_tuned"], metric)
                    return columns, None, False
            except (MlflowException, OSError, KeyError, ValueError):
                pass
        import tempfile

        from transformers import AutoModelForCausalLM

        from tasks.sources import load_registered

        log.info("champion v%s saw other prompts: scoring it on these", champion.version)
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer = load_registered(
                champion.name, champion.version, AutoModelForCausalLM, Path(tmp)
            )
        conversations = conversations_of(splits.test_path)
        chosen = [conversations[i] for i in logged["rows"]]
        generated = np.asarray(logged["generated"], dtype=int)
        question = Questions.of(
            tokenizer, chosen, generated, logged["labels"], evaluation.max_length
        )
        test = load_from_disk(tokenized.path)["test"].select(logged["rows"])
        judged = question.judge(
            model,
            test,
            None,
            batch_size,
            evaluation.max_new_tokens,
            only=metric,
        )
        columns, _, _ = metric_columns(logged, judged.logged(), metric)
        return columns, None, True

    def inference_config(self, cfg: EvalConfig, evaluation: EvalResult) -> dict[str, int | bool]:
        """Generation settings stored with the registered model (greedy, the answer budget)."""
        assert isinstance(evaluation, SFTEval)
        return {"max_new_tokens": evaluation.max_new_tokens, "do_sample": False}


def gate_metric(closed: list[str]) -> tuple[str, str]:
    """The gate's default metric for this data, and why."""
    if closed:
        return "accuracy", (
            f"the answers form a closed set of {len(closed)} ({', '.join(closed[:5])}"
            + ("…" if len(closed) > 5 else "")
            + "): accuracy of the most likely answer"
        )
    return "answer_loss", (
        "the answers are free-form: the mean token loss of the reference answers (lower is better)"
    )


@dataclass
class Judged:
    """One model's scores on the held-out rows (see :meth:`Questions.judge`)."""

    sums: np.ndarray  # answer-only loss summed per row
    counts: np.ndarray  # answer tokens per row
    picked: np.ndarray  # closed set: the most likely answer's index per row
    choice_scores: np.ndarray  # closed set: [rows, labels] summed log-probabilities
    answers: list[str]  # greedy answers of the generated rows
    capped: np.ndarray  # which of those hit max_new_tokens unfinished
    rouge: np.ndarray  # ROUGE-L of each generated answer against its reference
    general: tuple[np.ndarray, np.ndarray] | None  # general-text losses per block

    def row_loss(self, i: int | np.integer) -> float:
        return float(self.sums[i] / max(int(self.counts[i]), 1))

    def logged(self) -> dict[str, Any]:
        out = {
            "sums": to_list(self.sums),
            "counts": to_list(self.counts),
            "picked": to_list(self.picked),
            "choice_scores": to_list(self.choice_scores),
            "answers": self.answers,
            "capped": to_list(self.capped),
        }
        return out

    def metrics(
        self, references: list[str], generated: np.ndarray, labels: list[str]
    ) -> dict[str, float]:
        loss = perplexity(self.sums, self.counts)
        gen_refs = [references[i] for i in generated]
        judged = answer_metrics(gen_refs, self.answers, labels)
        out = {
            "answer_loss": loss["loss"],
            "answer_perplexity": loss["perplexity"],
            "exact_match": judged.pop("exact_match"),
            "rouge_l": float(np.mean(self.rouge)) if len(self.rouge) else 0.0,
            "generation_capped": float(np.mean(self.capped)) if len(self.capped) else 0.0,
            "generated_rows": float(len(generated)),
        }
        if labels:
            truth = label_ids(references, labels)
            scores = classification_metrics(truth, self.picked, labels)
            lengths = np.asarray([max(len(label), 1) for label in labels], dtype=float)
            normalised = (self.choice_scores / lengths).argmax(1)
            out |= {k: scores[k] for k in ("accuracy", "macro_f1")}
            out |= {f"f1/{label}": scores[f"f1/{label}"] for label in labels}
            out["accuracy_norm"] = float(np.mean(normalised == truth))
            out["outside_label_set"] = judged.pop("outside_label_set")
            out |= {f"generated_{k}": v for k, v in judged.items() if "/" not in k}
        return out


@dataclass
class HeldOut:
    """The held-out rows a judgment scored (their indices in the test split), as they were asked,
    and each model's scores on them."""

    rows: np.ndarray
    question: Questions
    fine: Judged
    zero: Judged


@dataclass
class Questions:
    """The held-out rows as a model is asked them: every row's prompt tokens and the candidate
    answers scored after it (the closed set's labels, else the row's own reference)."""

    tokenizer: PreTrainedTokenizerBase
    closed: bool  # the candidates are the label set (else each row's reference alone)
    generated: np.ndarray  # the rows answered greedily
    references: list[str]  # every row's reference answer
    prompt_ids: list[list[int]]  # every row's rendered prompt, with the generation prompt
    choices: list[list[list[int]]]  # every row's candidate answers' tokens
    # The candidate that is the row's whole reference answer (one answer, untruncated), whose
    # likelihood is its answer loss; -1 where the loss needs a pass of its own.
    truth: list[int]

    @classmethod
    def of(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        chosen: list[Conversation],
        generated: np.ndarray,
        labels: list[str],
        max_length: int,
    ) -> Questions:
        prompt_ids: list[list[int]] = []
        choices: list[list[list[int]]] = []
        truth: list[int] = []
        for messages in chosen:
            prompt = render(tokenizer, messages[:-1], generation_prompt=True)
            answer = messages[-1]["content"]
            row = []
            for candidate in labels or [answer]:
                full = render(
                    tokenizer,
                    [*messages[:-1], {"role": "assistant", "content": candidate}],
                    generation_prompt=False,
                )
                ids, tokens = continuation(tokenizer, prompt, full)
                row.append(tokens)
            prompt_ids.append(ids)
            choices.append(row)
            single = sum(m["role"] == "assistant" for m in messages) == 1
            t = (labels.index(answer) if answer in labels else -1) if labels else 0
            fits = single and t >= 0 and len(ids) + len(row[t]) <= max_length
            truth.append(t if fits else -1)
        return cls(
            tokenizer,
            bool(labels),
            generated,
            [m[-1]["content"] for m in chosen],
            prompt_ids,
            choices,
            truth,
        )

    def judge(
        self,
        model: PreTrainedModel,
        test: Dataset | None,  # the tokenized rows (needed for their answer loss only)
        general: Dataset | None,
        batch_size: int,
        max_new_tokens: int,
        only: str | None = None,
    ) -> Judged:
        """Score ``model`` on every row (``only``: just what the gate's metric needs).

        One pass over the prompts gives the candidates' likelihoods (the closed set's
        prediction, and the reference's answer loss) and the greedy answers of the generated
        rows; rows whose answer loss that pass cannot give (several answers, or truncated) get
        the answer-only loss of their tokenized conversation.
        """
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        answering = only in (None, "exact_match", "rouge_l")
        flags = np.zeros(len(self.prompt_ids), dtype=bool)
        flags[self.generated] = answering
        scored = score_prompts(
            model,
            self.prompt_ids,
            self.choices,
            batch_size,
            int(self.tokenizer.pad_token_id),
            flags.tolist(),
            max_new_tokens,
            stop_ids(model, self.tokenizer),
        )
        picked = scored.scores.argmax(1) if self.closed else np.zeros(0, dtype=int)
        choice_scores = scored.scores if self.closed else np.zeros((0, 0))
        sums, counts = np.zeros(0), np.zeros(0)
        if only in (None, "answer_loss"):
            truth = np.asarray(self.truth, dtype=int)
            sums, counts = np.zeros(len(self.truth)), np.zeros(len(self.truth))
            known = np.flatnonzero(truth >= 0)  # the reference is a candidate: its likelihood
            sums[known] = -scored.scores[known, truth[known]]
            counts[known] = [len(self.choices[i][truth[i]]) for i in known]
            rest = np.flatnonzero(truth < 0)
            if len(rest):
                assert test is not None, "these rows' answer loss needs their tokens"
                part = test.select(rest.tolist())
                sums[rest], counts[rest] = block_losses(model, part, self.tokenizer, batch_size)
        answers: list[str] = []
        capped, rouge = np.zeros(0, dtype=bool), np.zeros(0)
        if answering:
            answers = [
                str(self.tokenizer.decode(scored.answers[i], skip_special_tokens=True)).strip()
                for i in self.generated
            ]
            capped = np.asarray([scored.capped[i] for i in self.generated], dtype=bool)
            rouge = rouge_l([self.references[i] for i in self.generated], answers)
        losses = None
        if general is not None:
            losses = block_losses(model, general, self.tokenizer, batch_size)
        del model
        return Judged(sums, counts, picked, choice_scores, answers, capped, rouge, losses)
