"""Layer-pruned students: a copy of a model that keeps some of its decoder layers (``student.keep_layers``).

Depth pruning is how compression work makes a student that needs distilling: DistilBERT (Sanh et
al. 2019, §3) initialises its student from every other layer of the teacher; Minitron (Muralidharan
et al. 2024, arXiv:2407.14679, §2) drops whole layers of a trained model and then recovers it by
distillation. The kept layers keep their trained weights, embeddings and final norm stay, so the
student starts from the teacher's representations but far from its behaviour.
"""

from __future__ import annotations

from typing import Any

import torch


def keep_layer_indices(num_layers: int, keep: Any, key: str = "keep_layers") -> list[int]:
    """The layer indices that ``keep`` selects.

    Args:
        num_layers: the model's decoder layers L.
        keep: N (an int): N layers evenly spaced over ``[0, L−1]``, first and last included
            (``round(i·(L−1)/(N−1))``); or an explicit list of distinct, increasing indices.
        key: the config key, for messages.
    Returns:
        Increasing layer indices.
    Raises:
        ValueError: naming ``key`` when N is not in [1, L] or an index is out of range, repeated or unordered.
    """
    if isinstance(keep, bool):
        raise ValueError(f"{key} must be an int or a list of layer indices, got {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= num_layers:
            raise ValueError(f"{key}={keep}: the model has {num_layers} layers; keep between 1 and {num_layers}")
        if keep == 1:
            return [0]
        return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})
    indices = list(keep)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{key} must be an int or a non-empty list of layer indices, got {keep!r}")
    if any(not 0 <= i < num_layers for i in indices) or indices != sorted(set(indices)):
        raise ValueError(f"{key}={indices}: indices must be distinct, increasing and in [0, {num_layers - 1}]")
    return indices


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """``(the module holding the layer list, its attribute name)`` of a causal LM.

    Llama/Qwen/Mistral keep them in ``model.model.layers``, GPT-2 in ``model.transformer.h``.
    """
    base = getattr(model, "base_model", model)
    for name in ("layers", "h"):
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return base, name
    raise ValueError(f"keep_layers: cannot find the decoder layers of {type(model).__name__} "
                     "(expected base_model.layers or base_model.h)")


def prune_layers(model: torch.nn.Module, keep: Any, key: str = "keep_layers") -> list[int]:
    """Keep only the selected decoder layers of ``model``, in place; return the kept original indices.

    The config's layer count (and per-layer lists such as ``layer_types``) follow, and each kept
    attention layer gets its new position as ``layer_idx``, which the KV cache indexes by, so the
    pruned model generates, saves and reloads like an ordinary model of that depth.
    """
    holder, name = decoder_layers(model)
    layers = getattr(holder, name)
    indices = keep_layer_indices(len(layers), keep, key)
    setattr(holder, name, torch.nn.ModuleList([layers[i] for i in indices]))
    config = model.config
    for attribute in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attribute):
            setattr(config, attribute, len(indices))
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in indices]
    for new_index, layer in enumerate(getattr(holder, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return indices
