"""Forward passes that score completion tokens, the same code for teacher and student: full logits, or the final hidden
states with the output head that projects them (for the chunked loss, :mod:`opd.losses.chunked`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from opd.types import RolloutBatch


def completion_logits(model: torch.nn.Module, batch: RolloutBatch, prompt_ids: torch.Tensor | None = None,
                      prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits at every completion position.

    Position ``t`` of the result is the distribution the model assigns to ``completion_ids[:, t]``.
    Only the last ``T + 1`` positions are projected to the vocabulary (``logits_to_keep``).

    Args:
        model: a causal LM.
        batch: the rollouts.
        prompt_ids, prompt_mask: ``[B, P']`` an alternative left-padded prompt to condition on
            (e.g. OPSD's privileged-information prompt); the batch's own prompt by default.
    Returns:
        ``[B, T, V]`` logits.
    """
    prompt_ids = batch.prompt_ids if prompt_ids is None else prompt_ids
    prompt_mask = batch.prompt_mask if prompt_mask is None else prompt_mask
    input_ids = torch.cat([prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(batch.completion_ids)], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding does not shift positions
    num_completion = batch.completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=num_completion + 1, use_cache=False)
    return out.logits[:, :-1]


def trim_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[..., vocab_size]`` the first ``vocab_size`` logits of ``[..., V]``: the vocabulary a teacher-student pair
    shares, when one model's output head is padded past it. A view (the cut rows get no gradient), or ``logits``
    itself when nothing is cut."""
    return logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` log-probabilities of ``tokens`` ``[B, T]`` under ``logits`` ``[B, T, V]`` (computed in float32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclasses.dataclass
class HeadInputs:
    """What a model's output layer turns into logits: ``logits = hidden @ weight.T + bias``.

    Attributes:
        hidden: ``[..., H]`` final hidden states (after the model's final norm).
        weight: ``[V, H]`` output embedding (the ``lm_head`` weight, possibly tied to the input embedding).
        bias: ``[V]`` output bias, or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def first_rows(self, vocab_size: int) -> HeadInputs:
        """The head cut to its first ``vocab_size`` rows (``weight`` ``[vocab_size, H]``; views, so gradients reach the
        full parameters, zero on the cut rows): the logits ``[..., :vocab_size]`` of a vocabulary padded past the
        one it shares with the other model."""
        if self.weight.shape[0] == vocab_size:
            return self
        bias = None if self.bias is None else self.bias[:vocab_size]
        return HeadInputs(self.hidden, self.weight[:vocab_size], bias)


def linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output layer when logits are exactly ``Linear(hidden)``, else None.

    None for models without ``get_output_embeddings``, with a non-``Linear`` head, or with a logit
    transform after the head (Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``): those
    need the plain path.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in ("final_logit_softcapping", "logit_scale")):
        return None
    return head


def completion_hidden_states(model: torch.nn.Module, batch: Any, prompt_ids: torch.Tensor | None = None,
                             prompt_mask: torch.Tensor | None = None) -> HeadInputs:
    """The final hidden states at every completion position, with the head that projects them.

    The hidden-state twin of ``opd.models.scoring.completion_logits``: the same inputs, and
    ``hidden @ weight.T + bias`` equals its logits. Runs ``model.base_model`` (``model.model`` for
    Llama/Qwen, ``model.transformer`` for GPT-2), whose last hidden state is already normalised.

    Args:
        model: a causal LM for which :func:`linear_head` is not None.
        batch: a ``RolloutBatch`` (prompt_ids, prompt_mask, completion_ids).
        prompt_ids, prompt_mask: an alternative left-padded prompt (as in ``completion_logits``).
    Returns:
        ``HeadInputs`` with ``hidden`` ``[B, T, H]``.
    """
    head = linear_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no plain linear output head; use the full-logits path")
    prompt_ids = batch.prompt_ids if prompt_ids is None else prompt_ids
    prompt_mask = batch.prompt_mask if prompt_mask is None else prompt_mask
    input_ids = torch.cat([prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(batch.completion_ids)], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    num_completion = batch.completion_ids.shape[1]
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, -(num_completion + 1):-1]
    return HeadInputs(hidden, head.weight, head.bias)
