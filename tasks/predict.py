"""Predictions from a registered version, as ``fulltune predict`` serves them.

By default a version is loaded the way the gate loads a champion: its transformers weights from
safetensors and its tokenizer, with ``trust_remote_code=False``, and its ``MLmodel`` read as plain
YAML. Nothing the registry holds is executed. ``pyfunc=True`` loads it through
``mlflow.pyfunc`` instead (what ``mlflow models serve`` runs), which imports the Python the
version names: only for versions whose store you trust.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tasks.sources import SourceError, registered_artifacts, weights_in

CHAT_TASK = "llm/v1/chat"


@dataclass
class Predictor:
    """A registered version ready to answer: a classifier, a text generator or a chat model."""

    task: str  # the transformers pipeline task: text-classification or text-generation
    chat: bool  # answers conversations (llm/v1/chat)
    call: Any  # (model, tokenizer), or the pyfunc model
    config: dict[str, Any]  # the inference settings registered with the version
    pyfunc: bool

    def classify(self, texts: list[str], batch_size: int) -> pd.DataFrame:
        """A label and its score per text."""
        if self.pyfunc:
            parts = [
                self.call.predict(texts[i : i + batch_size])
                for i in range(0, len(texts), batch_size)
            ]
            return pd.concat(parts, ignore_index=True)[["label", "score"]]
        import torch

        model, tokenizer = self.call
        labels, scores = [], []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[i : i + batch_size], truncation=True, padding=True, return_tensors="pt"
            )
            with torch.inference_mode():
                logits = model(**batch).logits
            best = logits.float().softmax(-1).max(-1)
            labels += [model.config.id2label[int(k)] for k in best.indices]
            scores += best.values.tolist()
        return pd.DataFrame({"label": labels, "score": scores})

    def continue_texts(self, texts: list[str], batch_size: int) -> list[str]:
        """Each text followed by what the model writes next."""
        if self.pyfunc:
            return [
                str(g)
                for i in range(0, len(texts), batch_size)
                for g in self.call.predict(texts[i : i + batch_size])
            ]
        _, tokenizer = self.call
        out: list[str] = []
        for i in range(0, len(texts), batch_size):
            batch = texts[i : i + batch_size]
            new = self._generate(tokenizer(batch, padding=True, return_tensors="pt"))
            out += [
                text + tokenizer.decode(ids, skip_special_tokens=True)
                for text, ids in zip(batch, new, strict=True)
            ]
        return out

    def answer(self, value: Any) -> str:
        """The answer to a text (one user turn) or a conversation (messages, or their JSON)."""
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = json.loads(value)
        messages = (
            [{"role": "user", "content": str(value)}]
            if isinstance(value, str)
            else [dict(m) for m in value]
        )
        if self.pyfunc:
            reply = self.call.predict({"messages": messages})
            return str(reply[0]["choices"][0]["message"]["content"]).strip()
        _, tokenizer = self.call
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        [ids] = self._generate(prompt)
        return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()

    def predict(
        self, frame: pd.DataFrame, inputs: list[Any], batch_size: int
    ) -> tuple[pd.DataFrame, list[str]]:
        """``frame`` with the model's output columns, and one printable line per input: a chat
        model's answer, a classifier's label and score, or a text continued."""
        if self.chat:  # one conversation per request: a plain text is one user turn
            lines = [self.answer(value) for value in inputs]
            return frame.assign(answer=lines), lines
        texts = [str(t) for t in inputs]
        if self.task == "text-classification":  # a label and its score per text
            predictions = self.classify(texts, batch_size)
            out = frame.assign(
                label=predictions["label"].to_numpy(), score=predictions["score"].to_numpy()
            )
            rows = zip(out["label"], out["score"], texts, strict=True)
            return out, [f"{label}\t{score:.4f}\t{t}" for label, score, t in rows]
        lines = self.continue_texts(texts, batch_size)  # a text-generation model
        return frame.assign(generated_text=lines), lines

    def _generate(self, encoded: Any) -> list[Any]:
        """The new tokens of each prompt (left-padded), under the registered settings."""
        import torch

        model, tokenizer = self.call
        with torch.inference_mode():
            output = model.generate(**encoded, **self.config, pad_token_id=tokenizer.pad_token_id)
        return list(output[:, encoded["input_ids"].shape[1] :])


def load_predictor(name: str, version: str, pyfunc: bool = False) -> Predictor:
    """A registered version as a :class:`Predictor` (see the module docstring for ``pyfunc``).

    Raises:
        SourceError: the version's artifacts are gone, or hold no transformers model.
    """
    staging = Path(tempfile.mkdtemp(prefix="fulltune-predict-"))
    root = registered_artifacts(name, version, staging)
    try:
        mlmodel = yaml.safe_load((root / "MLmodel").read_text("utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise SourceError(f"models:/{name}/{version}: its MLmodel cannot be read: {err}") from err
    flavors = mlmodel.get("flavors") or {}
    flavor = flavors.get("transformers") or {}
    task = str(flavor.get("task") or "")
    if task not in ("text-classification", "text-generation"):
        raise SourceError(f"models:/{name}/{version}: not a fulltune model (task {task!r})")
    chat = flavor.get("inference_task") == CHAT_TASK
    config = dict((flavors.get("python_function") or {}).get("config") or {})
    if pyfunc:
        import mlflow.pyfunc

        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        except Exception as err:  # whatever the version's own code raises
            raise SourceError(
                f"models:/{name}/{version}: cannot be loaded through pyfunc: "
                f"{type(err).__name__}: {err}"
            ) from err
        return Predictor(task=task, chat=chat, call=model, config=config, pyfunc=True)
    return Predictor(
        task=task,
        chat=chat,
        call=_loaded(root, f"models:/{name}/{version}", task),
        config=config,
        pyfunc=False,
    )


def _loaded(root: Path, uri: str, task: str) -> tuple[Any, Any]:
    """The version's model and tokenizer, and nothing else of transformers (its pipelines
    import every modality's processors: seconds that one prediction does not need)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_dir, tokenizer_dir = weights_in(root, uri)  # the artifacts found once, above
    auto = (
        AutoModelForSequenceClassification
        if task == "text-classification"
        else AutoModelForCausalLM
    )
    model = auto.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    if task == "text-generation":  # batched generation pads on the left of each prompt
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
