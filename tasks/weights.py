"""Proof of full fine-tuning: which parameters a run changed, and a digest of the weights (equal
on every data-parallel rank). Under FSDP each rank holds shards, gathered here."""

from __future__ import annotations

import hashlib

import torch


def full(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on the CPU. Under FSDP each rank holds a shard (a DTensor):
    gathering it is a collective, so every rank must call this for the same parameters."""
    value = param.detach()
    gather = getattr(value, "full_tensor", None)
    return (gather() if gather is not None else value).cpu()


def master_weights(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every FSDP2 unit back on its fp32 shards. After a forward pass the root
    unit (embeddings and head) keeps its parameters gathered, in the compute dtype under bf16:
    the update check and the digest must read the master weights."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def fingerprint(value: torch.Tensor) -> torch.Tensor:
    """The low 16 bits of every value (all of a bf16's): 2 bytes per parameter, where a copy of
    fp32 weights would take 4. Any update of an fp32 value flips its low mantissa bits except
    one in about 65,536 (a change of an exact multiple of 2^16 steps), so a count of changed
    values read from it can only fall short of the truth, never exceed it."""
    flat = value.detach().contiguous().reshape(-1)
    halves = flat.view(torch.int16)
    return halves[:: flat.element_size() // 2].clone()  # little-endian: the low half first


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's :func:`fingerprint`, to prove afterwards that each one was updated."""
    model = master_weights(model)
    return {name: fingerprint(full(p)) for name, p in model.named_parameters()}


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: two models with the same digest have the same weights."""
    h = hashlib.sha256()
    for name, param in master_weights(model).named_parameters():
        h.update(name.encode())
        h.update(full(param).detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def count_updated(
    model: torch.nn.Module, before: dict[str, torch.Tensor]
) -> tuple[int, int, int, int]:
    """(params_total, params_updated, tensors_total, tensors_updated) against a snapshot."""
    params_total = params_updated = tensors_updated = 0
    for name, param in master_weights(model).named_parameters():
        changed = fingerprint(full(param)) != before[name]
        params_total += param.numel()
        params_updated += int(changed.sum())
        tensors_updated += int(bool(changed.any()))
    return params_total, params_updated, len(before), tensors_updated
