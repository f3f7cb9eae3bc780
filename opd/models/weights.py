"""A model's whole weights as ``(name, tensor)`` pairs, also when DeepSpeed ZeRO-3 partitions them.

Used wherever the student's current weights are copied out of the training process's model: into a
vLLM engine (:mod:`opd.sampling.vllm`) and into the shared buffers of the rollout worker (the engine's
``async_rollouts``, ``trainer.max_staleness``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from opd import distributed as dist
from opd.models.lora import adapter_tensors, has_adapters, merged_named_tensors


def named_full_tensors(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(checkpoint name, detached tensor)`` for every parameter and persistent buffer, each whole.

    Tied names are included (``lm_head.weight`` beside ``model.embed_tokens.weight``): a loader that
    maps names one to one needs both. Under ZeRO-3 this is a generator that gathers one parameter at a
    time (``deepspeed.zero.GatheredParameters``) and yields it while whole, so the caller must copy it
    before asking for the next one; the peak extra memory is one parameter, not the model. Every rank
    must then iterate it to the end (each gather is a collective).

    A LoRA student gives its merged weights under the base model's names (:func:`opd.models.lora.merged_named_tensors`),
    the function it computes; under ZeRO-3 the whole student is gathered at once to merge it (its peak memory is then
    the unsharded model's).
    """
    if not dist.is_zero3(model):
        if has_adapters(model):
            return merged_named_tensors(model)
        return [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
    if has_adapters(model):
        return _gathered_merged_tensors(model)
    return _gathered_named_tensors(model)


def named_sync_tensors(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """What a rollout worker needs of the learner's student after each update: a LoRA student's adapter weights only
    (its frozen base the worker loads itself), else every tensor (:func:`named_full_tensors`)."""
    if has_adapters(model):
        if dist.is_zero3(model):
            return _gathered(adapter_tensors(model))
        return adapter_tensors(model)
    return named_full_tensors(model)


def _gathered(pairs: Iterable[tuple[str, torch.Tensor]]):
    """Each ``(name, parameter)`` of a ZeRO-3 model gathered whole while it is yielded (a collective per parameter)."""
    import deepspeed

    for name, param in pairs:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield name, param.detach()


def _gathered_merged_tensors(model: torch.nn.Module):
    """Under ZeRO-3: the whole model gathered at once, merged, then released (every rank holds the unsharded model
    meanwhile; a per-layer gather would bound that, not done yet)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield from merged_named_tensors(model)


def _gathered_named_tensors(model: torch.nn.Module):
    yield from _gathered(model.named_parameters(remove_duplicate=False))  # tied names too (lm_head.weight)
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name in persistent:
            yield name, buffer.detach()


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` as a CPU copy (:func:`named_full_tensors`, so tied names and ZeRO-3 included)."""
    return {name: tensor.detach().cpu().clone() for name, tensor in named_full_tensors(model)}


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, those the optimizer trains) of ``model``, whole also under ZeRO-3 (``ds_numel``: a partitioned
    parameter's full size, its local tensor being empty). A LoRA student's adapters count in both."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, _ in sizes), sum(n for n, trained in sizes if trained)
