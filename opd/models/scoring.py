"""Forward passes that score completion tokens, the same code for teacher and student: full logits, or the final hidden
states with the output head that projects them (for the chunked loss, :mod:`opd.losses.chunked`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from opd.types import RolloutBatch


def completion_logits(model: torch.nn.Module, batch: RolloutBatch, prompt_ids: torch.Tensor | None = None,
                      prompt_mask: torch.Tensor | None = None, share_prompts: bool = False) -> torch.Tensor:
    """Next-token logits at every completion position.

    Position ``t`` of the result is the distribution the model assigns to ``completion_ids[:, t]``.
    Only the last ``T + 1`` positions are projected to the vocabulary (``logits_to_keep``).

    Args:
        model: a causal LM.
        batch: the rollouts.
        prompt_ids, prompt_mask: ``[B, P']`` an alternative left-padded prompt to condition on
            (e.g. OPSD's privileged-information prompt); the batch's own prompt by default.
        share_prompts: run each prompt that several consecutive rows repeat (``sampler.n`` samples of one prompt)
            once, and the completions against its cached keys and values (:func:`shared_prompt_forward`), when the
            model allows it (:func:`prompt_sharing_blocker`); the same logits to float rounding.
    Returns:
        ``[B, T, V]`` logits.
    """
    prompt_ids = batch.prompt_ids if prompt_ids is None else prompt_ids
    prompt_mask = batch.prompt_mask if prompt_mask is None else prompt_mask
    num_completion = batch.completion_ids.shape[1]
    groups = prompt_groups(prompt_ids, prompt_mask) if share_prompts else None
    if groups is not None and prompt_sharing_blocker(model) is None:
        first, rest = shared_prompt_forward(model, prompt_ids, prompt_mask, batch.completion_ids, groups, hidden=False)
        return torch.cat([first[:, None], rest[:, :-1]], dim=1)
    input_ids = torch.cat([prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(batch.completion_ids)], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding does not shift positions
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=num_completion + 1, use_cache=False)
    return out.logits[:, :-1]


#: model families whose forward pass with a key-value cache and explicit position ids is checked to give the logits of
#: one uncached pass (tests/test_pitfalls.py, every method; Llama covers SmolLM2 and the toy models)
PROMPT_SHARING_MODELS = ("llama",)
#: attention implementations checked with a cache and a left-padded prompt
PROMPT_SHARING_ATTENTION = ("sdpa", "eager")


def prompt_sharing_blocker(model: torch.nn.Module) -> str | None:
    """Why :func:`shared_prompt_forward` might not be exact for ``model``, or None when it is checked to be."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine's module
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PROMPT_SHARING_MODELS:
        return f"model type {model_type!r} is not one whose cached forward is checked ({', '.join(PROMPT_SHARING_MODELS)})"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in PROMPT_SHARING_ATTENTION:
        return f"attention implementation {attention!r} is not checked with a cache ({', '.join(PROMPT_SHARING_ATTENTION)})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    return None


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor | None:
    """``[B]`` the group of each row, where consecutive rows with the same prompt (ids and mask) form a group; None
    when no prompt repeats (nothing to share)."""
    rows = prompt_ids.shape[0]
    if rows < 2:
        return None
    same = ((prompt_ids[1:] == prompt_ids[:-1]) & (prompt_mask[1:] == prompt_mask[:-1])).all(dim=1)
    if not bool(same.any()):
        return None
    starts = torch.cat([torch.ones(1, dtype=torch.long, device=same.device), (~same).long()])
    return starts.cumsum(0) - 1


def shared_prompt_forward(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                          completion_ids: torch.Tensor, groups: torch.Tensor, hidden: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's prompt once, then every row's completion against the prompt's cached keys and values.

    The prompt pass runs on one row per group ``[G, P]``; its cache is expanded to the ``[B]`` rows (an index, so the
    backward pass sums the rows' gradients into the one prompt pass: the shared part is back-propagated once), and
    the completion pass ``[B, T]`` attends to it with the positions and mask one uncached pass over
    ``cat(prompt, completion)`` would have.

    Args:
        model: a causal LM (``hidden``: its ``base_model`` is run and the last hidden states returned).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts; the rows of one group are equal.
        completion_ids: ``[B, T]``.
        groups: ``[B]`` from :func:`prompt_groups`.
        hidden: final hidden states instead of logits.
    Returns:
        ``([B, X]`` the output at the last prompt position (it predicts completion token 0), ``[B, T, X]`` the outputs
        at the completion positions), X = V (logits) or H (hidden states).
    """
    from transformers import DynamicCache

    network = model.base_model if hidden else model
    first_rows = torch.cat([torch.zeros(1, dtype=torch.long, device=groups.device),
                            (groups[1:] != groups[:-1]).nonzero().squeeze(1) + 1])
    shared_ids, shared_mask = prompt_ids[first_rows], prompt_mask[first_rows]
    positions = (shared_mask.cumsum(dim=1) - 1).clamp(min=0)
    config = getattr(getattr(model, "module", model), "config", None)
    extra = {} if hidden else {"logits_to_keep": 1}
    out = network(input_ids=shared_ids, attention_mask=shared_mask, position_ids=positions,
                  past_key_values=DynamicCache(config=config), use_cache=True, **extra)
    cache = out.past_key_values
    for layer in cache.layers:  # [G, heads, P, d] -> [B, heads, P, d]; differentiable, so gradients meet in the prompt
        layer.keys, layer.values = layer.keys.index_select(0, groups), layer.values.index_select(0, groups)
    first = (out.last_hidden_state if hidden else out.logits)[:, -1].index_select(0, groups)
    num_completion = completion_ids.shape[1]
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)
    positions = prompt_mask.sum(dim=1, keepdim=True) + torch.arange(num_completion, device=completion_ids.device)
    extra = {} if hidden else {"logits_to_keep": num_completion}
    out = network(input_ids=completion_ids, attention_mask=attention_mask, position_ids=positions,
                  past_key_values=cache, use_cache=True, **extra)
    return first, (out.last_hidden_state if hidden else out.logits)


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
                             prompt_mask: torch.Tensor | None = None, share_prompts: bool = False) -> HeadInputs:
    """The final hidden states at every completion position, with the head that projects them.

    The hidden-state twin of ``opd.models.scoring.completion_logits``: the same inputs, and
    ``hidden @ weight.T + bias`` equals its logits. Runs ``model.base_model`` (``model.model`` for
    Llama/Qwen, ``model.transformer`` for GPT-2), whose last hidden state is already normalised.

    Args:
        model: a causal LM for which :func:`linear_head` is not None.
        batch: a ``RolloutBatch`` (prompt_ids, prompt_mask, completion_ids).
        prompt_ids, prompt_mask: an alternative left-padded prompt (as in ``completion_logits``).
        share_prompts: as in ``completion_logits``.
    Returns:
        ``HeadInputs`` with ``hidden`` ``[B, T, H]``.
    """
    head = linear_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no plain linear output head; use the full-logits path")
    prompt_ids = batch.prompt_ids if prompt_ids is None else prompt_ids
    prompt_mask = batch.prompt_mask if prompt_mask is None else prompt_mask
    groups = prompt_groups(prompt_ids, prompt_mask) if share_prompts else None
    if groups is not None and prompt_sharing_blocker(model) is None:
        first, rest = shared_prompt_forward(model, prompt_ids, prompt_mask, batch.completion_ids, groups, hidden=True)
        return HeadInputs(torch.cat([first[:, None], rest[:, :-1]], dim=1), head.weight, head.bias)
    input_ids = torch.cat([prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(batch.completion_ids)], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    num_completion = batch.completion_ids.shape[1]
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state[:, -(num_completion + 1):-1]
    return HeadInputs(hidden, head.weight, head.bias)
