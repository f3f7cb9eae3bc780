"""Switching dropout off in a model that is trained in train mode (``trainer.disable_dropout``).

Why: the loss of every method is computed from forward passes of the student in train mode, and
some methods compare them with numbers recorded in eval mode (MiniLLM's and the other
policy-gradient methods' q_old comes from the sampler, which decodes in eval mode). With dropout on,
log q_θ(y_t) carries dropout noise, so the importance ratio q_θ/q_old on fresh rollouts is not 1 and
a PPO clip drops gradients at random. The official MiniLLM code runs its RL phase in ``eval()``;
TRL's ``GKDConfig`` defaults to ``disable_dropout=True``.

How: every ``nn.Dropout``-like module gets ``p = 0``, and every float attribute of a module whose
name says it is a dropout probability (``attention_dropout`` of HF Llama/Qwen attention, which is
read at call time instead of through a module) is set to 0. The model's ``config`` is left as it
was, so checkpoints keep the architecture's own values.
"""

from __future__ import annotations

import torch

#: module attributes holding a dropout probability that HF attention layers read directly (not an nn.Dropout)
_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "attn_dropout", "resid_dropout", "hidden_dropout",
                       "dropout_rate", "attn_pdrop", "resid_pdrop")


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability inside ``model`` to 0 (in place).

    Args:
        model: any ``nn.Module`` (a Hugging Face causal LM, possibly wrapped).
    Returns:
        How many dropout settings were non-zero before (0: the model had no active dropout).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
        for name in _DROPOUT_ATTRIBUTES:
            value = module.__dict__.get(name)  # plain attributes only: submodules live in _modules
            if isinstance(value, float) and not isinstance(value, bool):
                changed += value > 0
                setattr(module, name, 0.0)
    return int(changed)


def active_dropout(model: torch.nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose dropout is non-zero (``[]`` after :func:`disable_dropout`)."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            names.append(module_name)
        names += [f"{module_name}.{attr}" for attr in _DROPOUT_ATTRIBUTES
                  if isinstance(module.__dict__.get(attr), float) and module.__dict__[attr] > 0]
    return names
