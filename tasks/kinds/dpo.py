"""Preference tuning (DPO): a chat LM learns to prefer the chosen answer to the rejected one.

Rows are the preference formats TRL documents: ``prompt`` / ``chosen`` / ``rejected`` as text, or
as message lists (conversational). Each pair becomes two conversations (the prompt with the
chosen answer, and with the rejected one) rendered by the chat template, so the contract, the
encoding and the answer-only labels are the SFT kind's, applied to both.

Training is the shared recipe with a loss of its own: the policy scores both answers of a batch's
pairs in one forward pass ([chosen; rejected], as TRL's ``DPOTrainer`` batches them) and the loss
compares their log-probability ratios to the reference, which is the starting model. The
reference's log-probabilities are computed once, before the first step (TRL's
``precompute_ref_log_probs``), so no second model is held in memory while training.

Judging is the SFT kind's on the held-out prompts, the chosen answers as references, against the
starting model (the parent version) on the same rows; the held-out pairs add preference accuracy,
the log-ratio margin and how each answer's log-probability moved.

``build_pairs`` (``fulltune pairs``) makes pairs from a model's own mistakes on labelled data:
the reference answer chosen, the model's wrong answer rejected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tasks.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from tasks.kinds.causal_lm import IGNORE
from tasks.kinds.sft import (
    SFT,
    HeldOut,
    Questions,
    SFTEval,
    _messages,
    _text,
    detect_format,
    encode_conversation,
    to_conversation,
    with_template,
)
from tasks.lm_scoring import answer_budget, closed_set, label_of, normalise_answer
from tasks.results import Checked, Prepared, TrainExtras
from tasks.sources import SourceError, load_registered, read_table, registered_source
from tasks.threads import THREADS

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase, Trainer

    from tasks.kinds.sft import Conversation

log = logging.getLogger(__name__)

PAIR_FIELDS = ("prompt_column", "chosen_column", "rejected_column")


def to_pair(row: dict[str, Any], cfg: DataConfig) -> tuple[Conversation, Conversation]:
    """(prompt + chosen, prompt + rejected) of one raw row. Raises ValueError naming the fault."""
    prompt, chosen, rejected = (row[getattr(cfg, f)] for f in PAIR_FIELDS)
    if isinstance(prompt, (list, np.ndarray)) or _is_json_list(prompt):  # message lists
        turns = _messages(prompt)
        answers = [_messages(chosen), _messages(rejected)]
    else:
        turns = [{"role": "user", "content": _text(prompt)}]
        answers = [
            [{"role": "assistant", "content": _text(answer)}] for answer in (chosen, rejected)
        ]
    if cfg.system_prompt and not (turns and turns[0].get("role") == "system"):
        turns = [{"role": "system", "content": cfg.system_prompt}, *turns]
    return turns + answers[0], turns + answers[1]


def _is_json_list(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("[")


def sequence_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Each row's summed log-probability of its labelled (answer) tokens.

    Only the answer positions go through the output layer (transformers' boolean
    ``logits_to_keep``) when the model takes it: a pair's prompt is most of its tokens, and the
    vocabulary projection and log-softmax of every prompt position are work no loss reads.
    """
    import torch
    from trl.trainer.utils import selective_log_softmax

    targets = labels[:, 1:]
    scored = targets != IGNORE
    if not _keeps_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        per_token = selective_log_softmax(logits[:, :-1].float(), targets.clamp(min=0))
        return (per_token * scored).sum(-1)
    keep = torch.nn.functional.pad(scored, (0, 1), value=False)  # the logit at t predicts t + 1
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep
    ).logits
    if not bool(scored.any()):  # every answer in the batch cut off by max_length: nothing to score
        return logits.sum() * 0 + torch.zeros(len(labels), device=logits.device)
    per_token = selective_log_softmax(logits.float(), targets[scored])
    rows = scored.nonzero()[:, 0]
    return torch.zeros(len(labels), dtype=per_token.dtype, device=per_token.device).index_add(
        0, rows, per_token
    )


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward slices its output layer by ``logits_to_keep`` (through a DDP
    or FSDP wrapper too)."""
    import inspect

    inner = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def chosen_nll(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The chosen answers' mean loss per token (TRL's ``sft`` loss term): ``logps`` and the
    answer ``tokens`` per sequence, [chosen; rejected] as :class:`PairBatches` orders them."""
    chosen, _ = logps.chunk(2)
    return -chosen.sum() / tokens.chunk(2)[0].sum().clamp(min=1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """The mean preference loss of a batch of pairs (TRL's ``sigmoid`` and ``hinge``).

    ``sigmoid`` is the DPO paper's -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)));
    ``hinge`` is SLiC's max(0, 1 - beta * (...)). ``tests/test_dpo.py`` checks it against TRL's
    ``DPOTrainer`` on the same batch.
    """
    import torch.nn.functional as F

    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * margin)).mean()
    if loss_type == "hinge":
        return F.relu(1 - beta * margin).mean()
    raise ValueError(f"train.dpo_loss: unknown loss {loss_type!r}")


PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1  # what each position of a pair's row holds


class PairBatches:
    """A batch of pairs, one row per pair: the prompt once, then the chosen answer, then the
    rejected one, which sees the prompt but not the chosen answer (a 4D attention mask) and
    continues the prompt's positions. A pair's two sequences share their prompt, most of their
    tokens when answers are short, so each prompt token is computed once instead of twice.

    Each answer token is predicted by the logit of the position before it in its own sequence:
    for the first token of either answer, the prompt's last position. ``targets`` lists them
    (row, predicting position, token, sequence), sequence ``i`` the chosen answer of pair ``i``
    and ``B + i`` its rejected one.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows, targets = [], []
        batch = len(features)
        for i, f in enumerate(features):
            chosen, rejected = list(f["input_ids"]), list(f["rejected_input_ids"])
            shared = _shared_prompt(chosen, rejected, f["labels"], f["rejected_labels"])
            tail = rejected[shared:]
            ids = chosen + tail
            branch = [PROMPT] * shared + [CHOSEN] * (len(chosen) - shared) + [REJECTED] * len(tail)
            positions = list(range(len(chosen))) + list(range(shared, len(rejected)))
            # A sequence's first token has no logit before it: never scored (as in one row).
            for k, token in enumerate(f["labels"]):
                if token != IGNORE and k > 0:
                    targets.append((i, k - 1, token, i))
            for k, token in enumerate(f["rejected_labels"]):
                if token != IGNORE and k > 0:  # its first answer token: from the prompt's end
                    at = shared - 1 if k == shared else len(chosen) + k - shared - 1
                    targets.append((i, at, token, batch + i))
            rows.append((ids, branch, positions))
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((batch, width), self.pad, dtype=torch.long)
        branches = torch.full((batch, width), PAD, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        for i, (ids, branch, positions) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            branches[i, : len(ids)] = torch.tensor(branch)
            position_ids[i, : len(ids)] = torch.tensor(positions)
        target = torch.tensor(targets, dtype=torch.long).reshape(-1, 4)
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "branches": branches,
            "targets": target,
            "answer_tokens": torch.bincount(target[:, 3], minlength=2 * batch),
        }
        if "ref_chosen_logp" in features[0]:
            out["ref_logps"] = torch.tensor(
                [f["ref_chosen_logp"] for f in features]
                + [f["ref_rejected_logp"] for f in features]
            )
        return out


def _shared_prompt(
    chosen: list[int], rejected: list[int], chosen_labels: list[int], rejected_labels: list[int]
) -> int:
    """How many leading tokens both sequences share before either's first answer token."""
    first = min(
        next((k for k, t in enumerate(labels) if t != IGNORE), len(labels))
        for labels in (chosen_labels, rejected_labels)
    )
    shared = 0
    while shared < first and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def tree_mask(branches: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """(B, 1, L, L): causal, and the rejected answer blind to the chosen one; a padding position
    sees only itself (no row without a key). Boolean (True: attend) for SDPA, or additive in
    ``dtype`` for eager attention."""
    import torch

    width = branches.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=branches.device).tril()
    query, key = branches[:, :, None], branches[:, None, :]
    allowed = causal & (key != PAD) & ~((query == REJECTED) & (key == CHOSEN))
    allowed |= torch.eye(width, dtype=torch.bool, device=branches.device)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=branches.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def pair_batch_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(2B,): each sequence's summed log-probability of its answer tokens, [chosen; rejected],
    from one forward pass over :class:`PairBatches` rows. Only the positions that predict an
    answer token go through the output layer (transformers' boolean ``logits_to_keep``)."""
    import torch
    from trl.trainer.utils import selective_log_softmax

    inner = getattr(model, "module", model)
    implementation = getattr(inner.config, "_attn_implementation", "sdpa")
    if implementation not in ("sdpa", "eager"):  # kernels without a 4D mask: two rows per pair
        input_ids, attention_mask, labels = unshared(batch)
        return sequence_logps(model, input_ids, attention_mask, labels)
    ids, targets = batch["input_ids"], batch["targets"]
    mask = tree_mask(batch["branches"], None if implementation == "sdpa" else inner.dtype)
    row, at, token, sequence = targets.unbind(1)
    if not len(token):  # every answer in the batch cut off by max_length: nothing to score
        size = len(batch["answer_tokens"])
        return torch.zeros(size, device=ids.device, requires_grad=torch.is_grad_enabled())
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": batch["position_ids"]}
    if _keeps_logits(model):
        keep = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        keep[row, at] = True
        index = keep.flatten().cumsum(0) - 1  # a kept position's row in the flat logits
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        picked = logits[index[row * ids.shape[1] + at]]
    else:
        picked = model(**inputs, use_cache=False).logits[row, at]
    per_token = selective_log_softmax(picked.float(), token)
    total = torch.zeros(len(batch["answer_tokens"]), dtype=per_token.dtype, device=ids.device)
    return total.index_add(0, sequence, per_token)


def unshared(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A :class:`PairBatches` batch as 2B right-padded rows, [chosen; rejected]: input ids,
    attention mask and answer labels, for :func:`sequence_logps`."""
    import torch

    ids, branches = batch["input_ids"], batch["branches"]
    pairs = ids.shape[0]
    parts = [{side: ids[i][branches[i] == side] for side in (PROMPT, CHOSEN)} for i in range(pairs)]
    rows = [torch.cat([p[PROMPT], p[CHOSEN]]) for p in parts]
    rows += [torch.cat([parts[i][PROMPT], ids[i][branches[i] == REJECTED]]) for i in range(pairs)]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros((2 * pairs, width), dtype=torch.long)
    attention = torch.zeros((2 * pairs, width), dtype=torch.long)
    labels = torch.full((2 * pairs, width), IGNORE, dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)] = r
        attention[j, : len(r)] = 1
    for i, at, token, sequence in batch["targets"].tolist():
        prompt, chosen = len(parts[i][PROMPT]), len(parts[i][CHOSEN])
        if sequence < pairs or at == prompt - 1:
            labels[sequence, at + 1] = token
        else:  # a later rejected token: the rejected row lacks the chosen answer's positions
            labels[sequence, at + 1 - chosen] = token
    return input_ids, attention, labels


def pair_logps(model: Any, dataset: Dataset, pad_token_id: int, batch_size: int) -> np.ndarray:
    """(rows, 2): the model's log-probability of each pair's chosen and rejected answer."""
    import torch

    collate = PairBatches(pad_token_id)
    columns = ["input_ids", "labels", "rejected_input_ids", "rejected_labels"]
    pairs = dataset.select_columns(columns)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(pairs), batch_size):
                THREADS.refit()  # another job may have started or ended
                rows = pairs[start : start + batch_size]
                features = [
                    dict(zip(rows, values, strict=True))
                    for values in zip(*rows.values(), strict=True)
                ]
                logps = pair_batch_logps(model, collate(features))
                out.append(logps.view(2, -1).T.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 2))


def judged_pairs(test: Dataset, held: HeldOut) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out pairs' log-probabilities that the closed-set judging already computed:
    ``(policy, reference, known)``, each ``(rows, 2)`` but ``known`` ``(rows,)``.

    A pair is known when both of its answers are candidates the judging scored after the same
    prompt tokens (a label of the closed set, as the pairs ``fulltune pairs`` builds are); its
    log-probabilities are then the fine-tuned and the starting model's choice scores.
    """
    policy, reference = np.zeros((len(test), 2)), np.zeros((len(test), 2))
    known = np.zeros(len(test), dtype=bool)
    if not held.question.closed:
        return policy, reference, known
    asked = {int(row): j for j, row in enumerate(held.rows)}
    columns = ["input_ids", "labels", "rejected_input_ids", "rejected_labels"]
    for i, pair in enumerate(test.select_columns(columns)):
        j = asked.get(i)
        if j is None:
            continue
        picks = [
            _candidate(held.question, j, pair[ids], pair[labels])
            for ids, labels in (columns[:2], columns[2:])
        ]
        if min(picks) < 0:
            continue
        policy[i] = held.fine.choice_scores[j, picks]
        reference[i] = held.zero.choice_scores[j, picks]
        known[i] = True
    return policy, reference, known


def _candidate(question: Questions, row: int, input_ids: list[int], labels: list[int]) -> int:
    """Which of ``row``'s scored candidates this answer is (its tokens, after the same prompt), or
    -1."""
    answer = [t for t, label in enumerate(labels) if label != IGNORE]
    if not answer or answer[-1] - answer[0] + 1 != len(answer):
        return -1
    start, stop = answer[0], answer[-1] + 1
    if input_ids[:start] != question.prompt_ids[row]:
        return -1
    tokens = input_ids[start:stop]
    return next((k for k, c in enumerate(question.choices[row]) if c == tokens), -1)


def preference_metrics(policy: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """What a DPO run is judged by on held-out pairs. The implicit reward of an answer is
    beta * (pi - ref); the margin is given without beta (in nats), so runs of any beta compare."""
    moved = policy - reference
    margin = moved[:, 0] - moved[:, 1]
    return {
        "preference_accuracy": float((margin > 0).mean()),
        "logratio_margin": float(margin.mean()),
        "chosen_logp_change": float(moved[:, 0].mean()),
        "rejected_logp_change": float(moved[:, 1].mean()),
    }


class DPO(SFT):
    """The preference-tuning kind (see :class:`tasks.kinds.Kind`); judged as :class:`SFT` is."""

    task = "dpo"
    yardstick = "its parent (the starting model)"

    # -- data --

    def columns(self, found: list[str], cfg: DataConfig) -> dict[str, str]:
        return {f"data.{field}": getattr(cfg, field) for field in PAIR_FIELDS}

    def derive(
        self, frame: pd.DataFrame, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
    ) -> pd.DataFrame:
        """Both conversations of every pair, checked as SFT checks one (``_`` columns), and what
        a pair adds: a rejected answer present, rendered, and different from the chosen."""
        missing = [getattr(cfg, f) for f in PAIR_FIELDS if getattr(cfg, f) not in frame.columns]
        chat = cfg.model_copy(update={"messages_column": "_pair", "format": "chat"})
        rows = []
        for row in frame.to_dict("records"):
            error: str | None = None
            chosen: Conversation = []
            rejected: Conversation = []
            if missing:
                error = f"columns {missing} missing for preference pairs"
            else:
                try:
                    chosen, rejected = to_pair(row, cfg)
                except (ValueError, KeyError, TypeError) as err:
                    error = f"pair: {err}"
            first = self._derive_row({"_pair": chosen}, "chat", chat, tokenizer, [])
            second = self._derive_row({"_pair": rejected}, "chat", chat, tokenizer, [])
            if error is None and second["_format_error"]:
                error = f"rejected: {second['_format_error']}"
            if error is not None:
                first["_format_error"] = error
            out: dict[str, Any] = {"_pair_differs": True}
            out["_rejected_present"] = second["_answers_present"]
            out["_rejected_renders"] = second["_template_renders"]
            if chosen and rejected:
                out["_pair_differs"] = (
                    _text(chosen[-1]["content"]).strip() != _text(rejected[-1]["content"]).strip()
                )
            # Duplicates are whole pairs (a prompt may have several); the split keeps a prompt's
            # pairs together (``text`` is the prompt), so none leaks from train into test.
            first["_prompt"] = first["_key_text"]
            if first["_key_text"] is not None and second["_all_text"] is not None:
                first["_key_text"] += "\n" + "\n".join(
                    _text(c[-1]["content"]) for c in (chosen, rejected)
                )
            first["_n_tokens"] = max(first["_n_tokens"], second["_n_tokens"])
            first["_rejected"] = second["_conversation"]
            if first["_all_text"] is not None and second["_all_text"] is not None:
                first["_all_text"] += "\n" + _text(rejected[-1]["content"] if rejected else "")
            rows.append(first | out)
        return pd.DataFrame(rows, index=frame.index)

    def normalise(self, frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
        """The prompt (``text``), prompt + chosen (``messages``: what SFT judging reads) and
        prompt + rejected (``rejected``), as JSON conversations."""
        return pd.DataFrame(
            {
                "text": frame["_prompt"].to_numpy(),
                "messages": frame["_conversation"].to_numpy(),
                "rejected": frame["_rejected"].to_numpy(),
            }
        )

    # -- training --

    def encode(
        self,
        dataset: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        cfg: ModelConfig,
    ) -> Dataset:
        """Both answers of a pair, rendered and labelled as SFT's (the answer tokens only)."""
        tokenizer = with_template(tokenizer, cfg)

        def _encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = {}
            for chosen, rejected in zip(batch["messages"], batch["rejected"], strict=True):
                a = encode_conversation(tokenizer, json.loads(chosen), cfg.tokens(), False)
                b = encode_conversation(tokenizer, json.loads(rejected), cfg.tokens(), False)
                shared = _shared_prompt(a["input_ids"], b["input_ids"], a["labels"], b["labels"])
                row = a | {
                    "rejected_input_ids": b["input_ids"],
                    "rejected_labels": b["labels"],
                    # A pair's row (PairBatches): the prompt once, then both answers. What a
                    # step computes, the memory preflight sizes and tokens/s counts.
                    "length": len(a["input_ids"]) + len(b["input_ids"]) - shared,
                }
                for key, value in row.items():
                    out.setdefault(key, []).append(value)
            return out

        return dataset.map(_encode, batched=True, remove_columns=dataset.column_names)

    def collator(self, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, training: bool) -> Any:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return PairBatches(int(tokenizer.pad_token_id))

    def train_extras(self, cfg: TrainConfig, train: Dataset, labels: list[str]) -> TrainExtras:
        """The DPO loss, and the reference's log-probabilities computed once before training."""
        beta, loss_type, batch_size = cfg.beta, cfg.dpo_loss, cfg.batch_size
        sft_weight = cfg.dpo_sft_weight

        def batch_loss(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
            logps = pair_batch_logps(model, inputs)
            chosen, rejected = logps.chunk(2)
            ref_chosen, ref_rejected = inputs["ref_logps"].to(logps.dtype).chunk(2)
            loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type)
            if not sft_weight:
                return loss
            return loss + sft_weight * chosen_nll(logps, inputs["answer_tokens"])

        def reference(model: Any, data: Any) -> Any:
            pad = model.config.pad_token_id
            pad = int(pad if pad is not None else (model.config.eos_token_id or 0))
            for split in list(data):
                logps = pair_logps(model, data[split], pad, batch_size)
                data[split] = (
                    data[split]
                    .add_column("ref_chosen_logp", logps[:, 0].tolist())
                    .add_column("ref_rejected_logp", logps[:, 1].tolist())
                )
            log.info(
                "reference log-probabilities of %s pairs computed once (the starting model)",
                {split: len(data[split]) for split in data},
            )
            return data

        notes = {
            "train.beta": str(beta),
            "train.dpo_loss": loss_type,
            "train.dpo_sft_weight": str(sft_weight),
        }
        return TrainExtras(batch_loss=batch_loss, reference=reference, notes=notes)

    def check(
        self, trainer: Trainer, validation: Dataset, labels: list[str], train: Dataset
    ) -> Checked:
        """Preference accuracy, reward margin and log-probability moves on validation pairs."""
        model = trainer.model
        pad = int(trainer.processing_class.pad_token_id)  # type: ignore[union-attr]
        policy = pair_logps(model, validation, pad, trainer.args.per_device_eval_batch_size)
        reference = np.stack(
            [
                np.asarray(validation["ref_chosen_logp"]),
                np.asarray(validation["ref_rejected_logp"]),
            ],
            axis=1,
        )
        return Checked(validation=preference_metrics(policy, reference))

    # -- evaluation --

    def evaluation_tokens(self, prepared: Prepared) -> float:
        """SFT's, and the policy and its parent on the held-out pairs."""
        return super().evaluation_tokens(prepared) + 2.0 * prepared.scored_test_tokens()

    def evaluate(self, model_dir: str, prepared: Prepared, workdir: Path) -> SFTEval:
        """SFT's judgment on the held-out prompts (the chosen answers as references, the
        starting model as the yardstick), and the preference metrics of the held-out pairs."""
        tokenized, model_cfg, cfg = prepared.tokenized, prepared.cfg.model, prepared.cfg.eval
        from datasets import load_from_disk
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tasks.kinds.causal_lm import setup_model

        result, held = self.judge_held_out(model_dir, prepared, workdir)
        test = load_from_disk(tokenized.path)["test"]
        policy, reference, known = judged_pairs(test, held)
        rest = np.flatnonzero(~known)
        log.info(
            "held-out pairs: %d of %d scored by the closed-set judging, %d scored on their own",
            len(test) - len(rest),
            len(test),
            len(rest),
        )
        if len(rest):
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
            part = test.select(rest.tolist())
            for out, model in (
                (policy, lambda: AutoModelForCausalLM.from_pretrained(model_dir)),
                (reference, lambda: setup_model(model_cfg, [])),
            ):
                out[rest] = pair_logps(model(), part, pad, cfg.batch_size)
        pairs = preference_metrics(policy, reference)
        if pairs["chosen_logp_change"] < 0:
            log.warning(
                "the chosen answers' log-probability fell by %.3f on held-out pairs (the known "
                "failure of DPO: both answers pushed down); train.dpo_sft_weight (say 0.2) holds "
                "the chosen answers up, a larger train.beta keeps the policy nearer its start",
                -pairs["chosen_logp_change"],
            )
        result.metrics |= pairs
        result.baseline_names = ("parent", "classical")
        return result


# --- pairs from a model's own mistakes (fulltune pairs) -----------------------------------


@dataclass
class Pairs:
    """The pairs built from one table, and what the model got right."""

    rows: list[dict[str, Any]]  # prompt / chosen / rejected, as message lists
    prompts: int
    right: int  # prompts the model answered right
    closed: list[str]  # the answer set, when closed

    def metrics(self) -> dict[str, float]:
        return {
            "pairs/prompts": float(self.prompts),
            "pairs/pairs": float(len(self.rows)),
            "pairs/model_accuracy": self.right / max(self.prompts, 1),
        }

    def skew(self, references: list[str]) -> str | None:
        """A warning when the chosen answers over-represent one answer of a closed set (more than
        1.5 times its share of the prompts): a DPO run learns to give it everywhere."""
        if not self.closed or not self.rows:
            return None
        data = pd.Series([normalise_answer(r) for r in references]).value_counts(normalize=True)
        chosen = pd.Series(
            [normalise_answer(r["chosen"][0]["content"]) for r in self.rows]
        ).value_counts(normalize=True)
        over = chosen / data.reindex(chosen.index).fillna(1.0)
        answer = str(over.idxmax())
        if over.max() <= 1.5:
            return None
        return (
            f"{chosen[answer]:.0%} of the pairs choose {answer!r} ({data.get(answer, 0):.0%} of "
            "the prompts): the model's mistakes over-represent it, and a DPO run on these pairs "
            "learns to answer it everywhere. --share-right 1 keeps every prompt (its most likely "
            "wrong answer rejected), so the chosen answers keep the data's balance"
        )

    def write(self, path: Path) -> None:
        """Write the pairs as JSONL, whole or not at all: a temporary file of this process's own
        (two commands writing one path do not interleave), renamed, or removed on failure."""
        import tempfile

        with tempfile.NamedTemporaryFile(
            "w",
            encoding="utf-8",
            dir=path.parent,
            prefix=f".{path.name}.",
            suffix=".partial",
            delete=False,
        ) as out:
            partial = Path(out.name)
            try:
                for row in self.rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            except BaseException:
                out.close()
                partial.unlink(missing_ok=True)
                raise
        partial.replace(path)


def conversations(cfg: DataConfig) -> list[Conversation]:
    """``data.train``'s rows as conversations (the SFT formats), each ending on its answer.

    Raises:
        SourceError: the table holds no conversation in its format (naming the row).
    """
    if cfg.train is None:
        raise SourceError("data.train: no table to build pairs from")
    frame = read_table(cfg.train).frame
    fmt = detect_format(list(frame.columns), cfg)
    out = []
    for i, row in enumerate(frame.to_dict("records")):
        try:
            messages = to_conversation(row, fmt, cfg)
        except (ValueError, KeyError, TypeError) as err:
            raise SourceError(f"{cfg.train}, row {i}: no {fmt} conversation: {err}") from err
        if not messages or messages[-1]["role"] != "assistant":
            raise SourceError(f"{cfg.train}, row {i}: the conversation does not end on an answer")
        out.append(messages)
    return out


def build_pairs(
    model_uri: str,
    chats: list[Conversation],
    data: DataConfig,
    model_cfg: ModelConfig,
    eval_cfg: EvalConfig,
    staging: Path,
    share_right: float = 0.0,
    seed: int = 0,
) -> tuple[Pairs, str]:
    """Pairs from the registered model's mistakes on ``chats``; and the pinned model URI.

    For each prompt the reference answer is chosen and the model's own wrong answer rejected:
    over a closed answer set (``data.labels``, or a few distinct answers), its most likely wrong
    candidate (multiple-choice scoring, one pass per prompt); otherwise its greedy answer. A
    prompt it answers right gives no pair, unless ``share_right`` asks for some (closed set
    only: its most likely wrong candidate).
    """
    from transformers import AutoModelForCausalLM

    source = registered_source(model_uri)
    model, tokenizer = load_registered(source.name, source.version, AutoModelForCausalLM, staging)
    tokenizer = with_template(tokenizer, model_cfg)
    references = [str(m[-1]["content"]) for m in chats]
    labels = closed_set(references, list(data.labels) if data.labels else None)
    everyone = np.arange(len(chats))
    # Only the prompts are read here: `auto` is the model's own limit.
    limit = (
        model_cfg.max_length
        if model_cfg.max_length != "auto"
        else int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    )
    questions = Questions.of(
        tokenizer, chats, np.zeros(0, int) if labels else everyone, labels, limit
    )
    budget, _ = answer_budget(eval_cfg.max_new_tokens, tokenizer, references)
    judged = questions.judge(
        model, None, None, eval_cfg.batch_size, budget, "accuracy" if labels else "exact_match"
    )
    rng = np.random.default_rng(seed)
    rows, right = [], 0
    for i, messages in enumerate(chats):
        reference = references[i]
        if labels:
            truth = label_of(reference, labels)
            scores = judged.choice_scores[i].copy()
            correct = int(judged.picked[i]) == truth
            if truth >= 0:
                scores[truth] = -np.inf
            rejected = labels[int(scores.argmax())]  # the most likely wrong candidate
        else:
            rejected = judged.answers[i]
            correct = normalise_answer(rejected) == normalise_answer(reference)
        right += correct
        if not rejected.strip() or (correct and not (labels and rng.random() < share_right)):
            continue
        rows.append(
            {
                "prompt": messages[:-1],
                "chosen": [{"role": "assistant", "content": reference}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    built = Pairs(rows, len(chats), right, labels)
    skew = built.skew(references)
    if skew:
        log.warning("%s", skew)
    return built, source.pinned
