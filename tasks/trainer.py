"""The recipe's ``Trainer``: samplers whose order depends only on the seed and the epoch (so a
resumed run continues exactly where it stopped), a kind's own batch loss, a scoring collator, and
the optimizer step in the backward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """HF's length-grouped sampler with its shuffle drawn from ``seed + epoch``.

    HF's draws from the global RNG when an epoch starts, so a run resumed mid-epoch would see
    another order than the one it was interrupted in. Seeded per epoch, the order depends only on
    the epoch, and a resumed run continues exactly where the interrupted one stopped.
    """

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class EpochSeededBalancedSampler(torch.utils.data.Sampler[int]):
    """Rows drawn with replacement so that every class is equally likely, seeded per epoch."""

    def __init__(self, labels: np.ndarray, seed: int) -> None:
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, len(self.weights), True, generator=generator)
        return iter(drawn.tolist())


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped from the backward pass as soon as that parameter's
    gradient is complete, which is then freed (torchtune's ``optimizer_in_bwd``): the gradients
    never all exist at once. The Trainer's ``step`` and ``zero_grad`` find nothing left to do.
    The learning-rate schedule reaches every parameter through :attr:`param_groups`, which are
    the per-parameter optimizers' own groups, and checkpoints hold every per-parameter state.

    ``params``: (parameter, weight decay) pairs; ``optimizer_cls`` and ``kwargs``: the optimizer
    the Trainer would have built (``Trainer.get_optimizer_cls_and_kwargs``).
    """

    def __init__(
        self,
        params: list[tuple[torch.nn.Parameter, float]],
        optimizer_cls: type[torch.optim.Optimizer],
        kwargs: dict[str, Any],
    ) -> None:
        self.optimizers = [
            optimizer_cls([{"params": [p], "weight_decay": d}], **kwargs) for p, d in params
        ]
        super().__init__([p for p, _ in params], {})
        self.param_groups = [o.param_groups[0] for o in self.optimizers]
        self.state = _States(self.optimizers)  # type: ignore[assignment]
        self.hooks = [
            p.register_post_accumulate_grad_hook(_step_and_free(o))
            for (p, _), o in zip(params, self.optimizers, strict=True)
        ]

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Nothing: every parameter was stepped in the backward pass."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: every gradient was freed once its parameter was stepped."""

    def state_dict(self) -> dict[str, Any]:
        return {"per_parameter": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["per_parameter"], strict=True):
            optimizer.load_state_dict(state)
        # Loading gives each optimizer new group dicts: the schedule must set those.
        self.param_groups = [o.param_groups[0] for o in self.optimizers]

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()


class _States(Mapping[torch.Tensor, Any]):
    """Every per-parameter optimizer's state, read through one mapping (a lookup never adds a
    key to their ``defaultdict``s, as a ``ChainMap`` would)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def __getitem__(self, param: torch.Tensor) -> Any:
        for optimizer in self.optimizers:
            if param in optimizer.state:
                return optimizer.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for optimizer in self.optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self.optimizers)


def _step_and_free(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    def hook(_: torch.Tensor) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return hook


class FinetuneTrainer(Trainer):
    """``Trainer`` with resumable (epoch-seeded) samplers and a collator of its own for scoring.

    A packed training batch is one long row; validation batches (``eval.batch_size`` rows) stay
    padded rows, so scoring never builds one attention matrix over the whole batch.
    """

    def __init__(
        self,
        *args: Any,
        balanced_labels: np.ndarray | None = None,
        eval_collator: Any = None,
        batch_loss: Callable[[Any, dict[str, Any]], torch.Tensor] | None = None,
        optimizer_in_backward: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.optimizer_in_backward = optimizer_in_backward
        self.balanced_labels = balanced_labels
        self.eval_collator = eval_collator
        self.batch_loss = batch_loss
        if batch_loss is not None:  # its collator reads columns the model's forward does not take
            self.args.remove_unused_columns = False

    def create_accelerator_and_postprocess(self) -> None:
        """FSDP2 on CPU processes too. accelerate turns the FSDP plugin into FSDP only on
        accelerators, and CPU ranks (gloo) would quietly train DDP; the same plugin makes their
        model one ``fully_shard`` per transformer block, as on GPUs."""
        super().create_accelerator_and_postprocess()
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if self.args.fsdp_plugin_args is None or state.distributed_type == DistributedType.FSDP:
            return
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        # Every later AcceleratorState() copies the process state's type over its own.
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, or with ``optimizer_in_backward`` one of the same class and
        settings per parameter, stepped in the backward pass (:class:`InBackwardOptimizer`)."""
        if not self.optimizer_in_backward or self.optimizer is not None:
            return super().create_optimizer(model)
        module: Any = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(module))
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, module)
        params = [
            (p, self.args.weight_decay if name in decay else 0.0)
            for name, p in module.named_parameters()
            if p.requires_grad
        ]
        self.optimizer = InBackwardOptimizer(params, optimizer_cls, kwargs)
        return self.optimizer

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:  # a later backward pass (scoring with gradients, a second fit) steps nothing
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
            if isinstance(inner, InBackwardOptimizer):
                inner.remove_hooks()

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.batch_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.batch_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        if self.batch_loss is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.batch_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        if self.eval_collator is None:
            return super().evaluate(*args, **kwargs)
        training_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = training_collator

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.balanced_labels is not None:
            return EpochSeededBalancedSampler(self.balanced_labels, seed)
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            return EpochSeededLengthGroupedSampler(
                sampler.batch_size, lengths=sampler.lengths, seed=seed
            )
        return sampler
