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

from opd.config import keep_layer_indices as keep_layer_indices  # a config value's form, checked there too


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
