"""Forward passes that score completion tokens: the same code for teacher and student."""

from __future__ import annotations

import torch

from opd.sampling.base import RolloutBatch


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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` log-probabilities of ``tokens`` ``[B, T]`` under ``logits`` ``[B, T, V]`` (computed in float32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
