"""The recipe's ``Trainer``: samplers whose order depends only on the seed and the epoch (so a
resumed run continues exactly where it stopped), a kind's own batch loss, and a scoring collator."""

from __future__ import annotations

from collections.abc import Callable
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
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
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
