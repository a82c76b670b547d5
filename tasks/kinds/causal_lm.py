"""Causal language modelling: next-token prediction on raw text, GPT-2 style.

The model's own shifted cross-entropy is the loss (``labels`` are the input ids; positions marked
-100 are padding and left out). Documents are joined with EOS and cut into ``max_length`` blocks
(packing, as in transformers' ``run_clm.py``), or kept one per example. The measure is perplexity,
``exp`` of the mean loss over predicted tokens (not over batches), next to the untrained model and
a unigram model on the same tokens; a few prompts are completed to show what the model writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from tasks.caching import digest
from tasks.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from tasks.lm_scoring import (
    forward_takes,
    general_blocks,
    mean_loss,
    read_general_texts,
    record_general,
)
from tasks.results import (
    Checked,
    EvalResult,
    Evidence,
    InputExample,
    Prepared,
    Splits,
    TrainExtras,
)
from tasks.sources import fingerprint, resolve_model
from tasks.threads import THREADS

# torch, transformers' models and datasets load where they are used: the data contract (the first
# stage) needs none of them, and importing them takes seconds.
if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        Trainer,
    )

log = logging.getLogger(__name__)
IGNORE = -100  # label of a position that is not scored (padding)


def document_separator(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a document: EOS, or SEP for BERT-style vocabularies without one."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has neither an EOS nor a SEP token")


def pack(documents: list[list[int]], block_size: int) -> list[list[int]]:
    """Concatenate token lists and cut the stream into ``block_size`` blocks.

    Every token lands in exactly one block, in order; only the last block may be shorter.
    """
    stream = list(chain.from_iterable(documents))
    return [stream[i : i + block_size] for i in range(0, len(stream), block_size)]


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads ``input_ids`` with the pad token and ``labels`` with -100 (left out of the loss)."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token is None:  # GPT-2 has none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)


def setup_model(cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
    """The pretrained model with a causal LM head, every weight trainable.

    ``is_decoder`` makes an encoder checkpoint (BERT) attend causally, so it can be trained and
    used as a left-to-right language model; decoder-only models (GPT-2) are unaffected.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model(cfg.name_or_path)
    config = AutoConfig.from_pretrained(path, revision=cfg.revision)
    if getattr(config, "is_decoder", None) is False:  # encoder configs have the switch
        config.is_decoder = True
    model = AutoModelForCausalLM.from_pretrained(path, revision=cfg.revision, config=config)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def block_losses(
    model: PreTrainedModel, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(summed next-token loss, predicted tokens) per example, in the dataset's order.

    Batches hold rows of similar length (little padding to compute); results come back in order.
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    sparse_logits = forward_takes(model, "logits_to_keep")
    collate = collator(tokenizer)
    columns = ["input_ids", "attention_mask", "labels"]
    order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
    sums, counts = [], []
    for start in range(0, len(dataset), batch_size):
        THREADS.refit()  # another job may have started or ended
        rows = dataset.select(order[start : start + batch_size].tolist())
        batch = collate([{k: row[k] for k in columns} for row in rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        # Position t predicts token t+1: the same shift as the model's own loss.
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE
        keep = scored.any(0).nonzero()[:, 0]  # positions some row predicts a target from
        extra = {}
        if len(keep) < targets.shape[1] and sparse_logits:
            extra = {"logits_to_keep": keep}  # the vocabulary projection only where needed
        else:
            keep = torch.arange(targets.shape[1], device=device)
        with torch.no_grad():
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits
            logits = logits[:, : len(keep)].float()  # kept positions (all but the last, or fewer)
            wanted = targets[:, keep]
            # -log p(target) = logsumexp(logits) - logit(target): no vocabulary-wide temporaries
            picked = logits.gather(-1, wanted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            loss = (torch.logsumexp(logits, -1) - picked) * (wanted != IGNORE)
        sums.append(loss.sum(1).cpu().numpy())
        counts.append(scored.sum(1).cpu().numpy())
    if not sums:
        return np.zeros(0), np.zeros(0, dtype=int)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))  # sorted position of each row
    return np.concatenate(sums)[back], np.concatenate(counts)[back]


def perplexity(sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Mean token loss and its exp, over all predicted tokens (not averaged per batch)."""
    loss = float(sums.sum() / max(int(counts.sum()), 1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(counts.sum())}


def validation_perplexity(trainer: Trainer, validation: Dataset) -> Checked:
    """The selected model's loss and perplexity over the validation split's scored tokens."""
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    model, tokenizer = trainer.model, trainer.processing_class
    assert isinstance(model, PreTrainedModel) and isinstance(tokenizer, PreTrainedTokenizerBase)
    sums, counts = block_losses(
        model, validation, tokenizer, trainer.args.per_device_eval_batch_size
    )
    return Checked(validation=perplexity(sums, counts))


def unigram_perplexity(train: Dataset, test: Dataset, vocab_size: int) -> dict[str, float]:
    """A unigram model of the training tokens (add-one smoothing) on the test's predicted tokens.

    The classical yardstick: a fine-tuned LM that cannot beat word frequencies has learnt nothing
    about context.
    """
    counts = np.bincount(np.concatenate(train["input_ids"]), minlength=vocab_size) + 1.0
    log_prob = np.log(counts / counts.sum())
    targets = np.concatenate([np.asarray(ids[1:]) for ids in test["labels"]])
    targets = targets[targets != IGNORE]
    loss = float(-log_prob[targets].mean())
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(len(targets))}


def new_tokens(cfg: EvalConfig) -> int:
    """``eval.max_new_tokens`` for completions of raw text: ``auto`` is 20."""
    return 20 if cfg.max_new_tokens == "auto" else int(cfg.max_new_tokens)


def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, seed: int
) -> list[dict[str, str]]:
    """Completions of ``cfg.prompts``: greedy, or top-p sampled with a fixed seed."""
    from transformers import set_seed

    model.eval()
    set_seed(seed)
    out = []
    for prompt in cfg.prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
        generated = model.generate(  # type: ignore[operator]
            **ids,
            max_new_tokens=new_tokens(cfg),
            do_sample=cfg.do_sample,
            top_p=0.9 if cfg.do_sample else None,
            pad_token_id=tokenizer.pad_token_id,
        )
        completion = str(
            tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        )
        out.append({"prompt": prompt, "completion": completion})
    return out


class LMEvalResult(EvalResult):
    """Test loss and perplexity of the model, the untrained model (``baseline``) and a unigram
    model of the training tokens (``classical``), and sample generations."""

    tokenizer: str
    generations: list[dict[str, str]]
    generations_path: str

    headline_keys: tuple[str, ...] = ("loss", "perplexity")
    baseline_names: tuple[str, str] = ("untrained model", "unigram")

    def artifacts(self) -> list[str]:
        return [*super().artifacts(), self.generations_path]

    def version_tags(self) -> dict[str, str]:
        return {
            "test.fingerprint": self.test_fingerprint,
            "test.tokenizer": self.tokenizer,
            "test.perplexity": f"{self.metrics['perplexity']:.4f}",
        }

    def tables(self) -> dict[str, list[dict[str, str]]]:
        return {"evaluation/generations_table.json": self.generations}

    def details_markdown(self) -> str:
        rows = ["| prompt | completion |", "|---|---|"]
        rows += [f"| {_cell(g['prompt'])} | {_cell(g['completion'])} |" for g in self.generations]
        return "## Generations\n\n" + "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def vocabulary_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary and the special tokens: what makes two token counts comparable.

    Not the tokenizer's path: every run saves its own copy of the same tokenizer.
    """
    return digest(sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens)


def read_losses(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-block (loss sums, token counts) as ``evaluate`` wrote them to ``test_losses.json``."""
    logged = json.loads(Path(path).read_text())
    return np.asarray(logged["sums"]), np.asarray(logged["counts"])


class CausalLM:
    """The causal-LM kind (see :class:`tasks.kinds.Kind`)."""

    task = "causal-lm"
    pipeline_task = "text-generation"
    mlflow_task = "text-generation"
    headline, headline_higher = "perplexity", False
    gate_metrics: tuple[str, ...] = ("perplexity",)
    selection_metric = "loss"
    greater_is_better = False
    has_labels = False

    def signature(self) -> ModelSignature:
        return ModelSignature(
            inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")])
        )

    def columns(self, found: list[str], cfg: DataConfig) -> dict[str, str]:
        return {"data.text_column": cfg.text_column}

    def derive(
        self, frame: pd.DataFrame, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
    ) -> pd.DataFrame:
        return pd.DataFrame(index=frame.index)  # the contract's generic columns suffice

    def normalise(self, frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
        return pd.DataFrame({"text": frame[cfg.text_column].astype(str).to_numpy()})

    def input_example(self, splits: Splits) -> InputExample:
        return pd.read_parquet(splits.test_path)["text"].head(3).tolist()

    def encode(
        self,
        dataset: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        cfg: ModelConfig,
    ) -> Dataset:
        """Documents -> LM examples: packed blocks (default) or one truncated example per document.

        EOS follows every document, so the model learns where a text ends. ``labels`` are the input
        ids: the model shifts them itself to predict each next token.
        """
        eos = document_separator(tokenizer)

        def _encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            documents = [[*doc, eos] for doc in ids]
            if cfg.packing:
                examples = pack(documents, cfg.tokens())
            else:
                examples = [doc[: cfg.tokens()] for doc in documents]
            return {
                "input_ids": examples,
                "attention_mask": [[1] * len(x) for x in examples],
                "labels": examples,
                "length": [len(x) for x in examples],
            }

        # One batch for the whole split: a packed stream has a single short tail, not one per batch.
        return dataset.map(
            _encode,
            batched=True,
            batch_size=None if cfg.packing else 1000,
            remove_columns=dataset.column_names,
        )

    def setup_model(self, cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
        return setup_model(cfg, labels)

    def collator(
        self, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, training: bool
    ) -> DataCollatorForSeq2Seq:
        return collator(tokenizer)  # packed blocks are full: padding only for the last one

    def compute_metrics(self, labels: list[str]) -> None:
        return None  # selection uses the Trainer's eval_loss; perplexity is computed over tokens

    def train_extras(self, cfg: TrainConfig, train: Dataset, labels: list[str]) -> TrainExtras:
        return TrainExtras()

    def check(
        self, trainer: Trainer, validation: Dataset, labels: list[str], train: Dataset
    ) -> Checked:
        """Validation loss and perplexity of the selected model, over tokens."""
        return validation_perplexity(trainer, validation)

    def evaluation_tokens(self, prepared: Prepared) -> float:
        """The model and the untrained base over the test blocks, and the general text."""
        return 2.0 * prepared.scored_test_tokens() + prepared.general_text_tokens()

    def evaluate(self, model_dir: str, prepared: Prepared, workdir: Path) -> LMEvalResult:
        """Perplexity on the test split (fine-tuned, untrained, unigram) and sample generations."""
        tokenized, labels, splits = prepared.tokenized, prepared.data.labels, prepared.splits
        model_cfg, cfg, seed = prepared.cfg.model, prepared.cfg.eval, prepared.cfg.train.seed
        from datasets import load_from_disk
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

        data = load_from_disk(tokenized.path)
        test = data["test"]
        if cfg.max_test_samples is not None and cfg.max_test_samples < len(test):
            test = test.shuffle(seed=seed).select(range(cfg.max_test_samples))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        started = time.perf_counter()
        general = None
        if cfg.general_text:
            texts = read_general_texts(cfg.general_text, cfg.general_text_column)
            general = general_blocks(texts, tokenizer, model_cfg.tokens(), cfg.general_blocks)
        sums, counts = block_losses(model, test, tokenizer, cfg.batch_size)
        generations = generate(model, tokenizer, cfg, seed)
        after = block_losses(model, general, tokenizer, cfg.batch_size) if general else None
        scoring_s = time.perf_counter() - started
        set_seed(seed)  # the same initial weights (and new head) that training started from
        untrained = setup_model(model_cfg, labels)
        started = time.perf_counter()
        base_sums, base_counts = block_losses(untrained, test, tokenizer, cfg.batch_size)
        before = block_losses(untrained, general, tokenizer, cfg.batch_size) if general else None
        scoring_s += time.perf_counter() - started
        general_path: str | None = None
        general_summary: dict[str, float] = {}
        if after is not None and before is not None:
            general_path, general_summary = record_general(workdir, after, before)
        losses_path = workdir / "test_losses.json"
        losses_path.write_text(json.dumps({"sums": sums.tolist(), "counts": counts.tolist()}))
        generations_path = workdir / "generations.json"
        generations_path.write_text(json.dumps(generations, indent=2, ensure_ascii=False))
        return LMEvalResult(
            metrics=perplexity(sums, counts),
            scoring_s=scoring_s,
            baseline=perplexity(base_sums, base_counts),
            classical=unigram_perplexity(data["train"], test, len(tokenizer)),
            test_rows=len(test),
            test_fingerprint=fingerprint(pd.read_parquet(splits.test_path)),
            tokenizer=vocabulary_identity(tokenizer),
            generations=generations,
            scores_path=str(losses_path),
            generations_path=str(generations_path),
            general=general_summary,
            general_path=general_path,
        )

    def evidence(self, evaluation: EvalResult, metric: str) -> Evidence:
        """Per-block (loss sums, token counts); compared in mean token loss, shown as perplexity.

        The margin ``promote.min_delta`` is therefore in nats of mean token loss.
        """
        return Evidence(
            metric=metric,
            columns=read_losses(evaluation.scores_path),
            statistic=mean_loss,
            higher_is_better=False,
            floors={
                "untrained model": evaluation.baseline["loss"],
                "unigram": evaluation.classical["loss"],
            },
            reported=lambda loss: math.exp(min(loss, 700.0)),
        )

    def champion_columns(
        self, champion: ModelVersion, evaluation: EvalResult, prepared: Prepared, metric: str
    ) -> tuple[tuple[np.ndarray, ...] | None, str | None, bool]:
        """The champion's per-block losses on this test split: logged, or scored again.

        Perplexities under different tokenizers count different tokens, so they are never
        compared.
        """
        tokenized, batch_size = prepared.tokenized, prepared.cfg.eval.batch_size
        from datasets import load_from_disk
        from transformers import AutoModelForCausalLM

        assert isinstance(evaluation, LMEvalResult)
        if champion.tags.get("test.tokenizer") != evaluation.tokenizer:
            return (
                None,
                "the champion uses another tokenizer: perplexities are not comparable",
                False,
            )
        client = MlflowClient()
        if champion.tags.get("test.fingerprint") == evaluation.test_fingerprint:
            try:
                path = client.download_artifacts(
                    str(champion.run_id), "evaluation/test_losses.json"
                )
                losses = read_losses(path)
                if len(losses[0]) == evaluation.test_rows:
                    return losses, None, False
            except (MlflowException, OSError):
                pass
        test = load_from_disk(tokenized.path)["test"]
        if evaluation.test_rows < len(test):
            return None, "the gate needs the whole test split (eval.max_test_samples unset)", False
        import tempfile

        from tasks.sources import load_registered

        log.info("champion v%s saw another test set: scoring it on this one", champion.version)
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer = load_registered(
                champion.name, champion.version, AutoModelForCausalLM, Path(tmp)
            )
        return block_losses(model, test, tokenizer, batch_size), None, True

    def inference_config(self, cfg: EvalConfig, evaluation: EvalResult) -> dict[str, int | bool]:
        """Generation settings stored with the registered model (pyfunc ``predict`` uses them)."""
        return {"max_new_tokens": new_tokens(cfg), "do_sample": cfg.do_sample}
