"""Rollout batches and the sampler interface shared by every behaviour policy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from opd.errors import ConfigError
from opd.types import Example
from opd.types import RolloutBatch as RolloutBatch  # its home is opd.types (below every layer); re-exported


def check_sampling_params(temperature: float, top_p: float, top_k: int, max_new_tokens: int, n: int = 1) -> None:
    """The sampling settings every sampler shares, checked at config time.

    Raises:
        ValueError: naming the first value out of range.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy evaluation for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")


def eos_token_ids(tokenizer, *models: torch.nn.Module) -> list[int]:
    """Every token id that ends a sequence: the tokenizer's EOS plus each model's declared ones.

    A model declares EOS in ``generation_config.eos_token_id`` and/or ``config.eos_token_id``, an int
    or a list (Qwen3 instruct: ``<|im_end|>`` and ``<|endoftext|>``). Generation stops at, and
    ``truncate_after_eos`` masks after, the first of *any* of them; stopping at the tokenizer's EOS
    alone would train on text after the end. Pass the model that writes the completions (each
    model stops at its own set); with several models (joint decoding) the union of their sets.

    Returns:
        the ids, deduplicated, the tokenizer's first.
    """
    declared: list[Any] = [tokenizer.eos_token_id]
    for model in models:
        for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            declared.append(getattr(config, "eos_token_id", None))
    ids: list[int] = []
    for entry in declared:
        for token in ([] if entry is None else [entry] if isinstance(entry, int) else list(entry)):
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def eos_id_tensor(eos_token_id: int | Sequence[int], device: torch.device | str) -> torch.Tensor:
    """``[E]`` long tensor of the EOS id(s), for ``torch.isin`` against generated tokens."""
    return torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long,
                           device=device)


def truncate_after_eos(completion_ids: torch.Tensor, eos_token_id: int | Sequence[int], pad_token_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask everything after each row's first EOS (any of ``eos_token_id``: see :func:`eos_token_ids`).

    Args:
        completion_ids: ``[B, T]`` generated tokens.
    Returns:
        ``(ids, mask)``, both ``[B, T]``: ids with pad after the first EOS; mask 1 up to and including it.
    """
    is_eos = torch.isin(completion_ids, eos_id_tensor(eos_token_id, completion_ids.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after_eos).long()
    return completion_ids.masked_fill(after_eos, pad_token_id), mask


def unfinished_rows(batch: RolloutBatch, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """``[B]`` bool: rows whose completion holds no EOS (any of ``eos_token_id``), i.e. cut by the length budget
    (an empty row, all padding, counts as unfinished too)."""
    is_eos = torch.isin(batch.completion_ids, eos_id_tensor(eos_token_id, batch.completion_ids.device))
    return ~(is_eos & batch.completion_mask.bool()).any(dim=1)


def suppress_padding_ids(sampler: Sampler, vocab_size: int, models: dict[str, torch.nn.Module | None]) -> None:
    """Keep each model with more output rows than the shared ``vocab_size`` from generating the extra ids.

    They are padding, not tokens, and the other model has no logit for them. The ids go into the model's
    ``generation_config.suppress_tokens``, which Hugging Face ``generate`` applies as a -inf logit (sampling, greedy
    evaluation). A sampler that ignores it (vLLM) is refused for such a pair (MiniLLM's joint decoding cuts the logits
    itself).

    Args:
        models: role ("student", "teacher") -> model, or None when the role has no local model.
    Raises:
        ConfigError: the sampler does not honour ``suppress_tokens`` and a model has padding rows.
    """
    for role, model in models.items():
        rows = model.get_output_embeddings().weight.shape[0] if model is not None else 0
        if rows <= vocab_size:
            continue
        if not sampler.honours_suppress_tokens:
            raise ConfigError(f"the {type(sampler).__name__} sampler cannot keep the {role} from generating the "
                              f"{rows - vocab_size} padding ids past the shared vocabulary ({role} {rows} rows, shared "
                              f"{vocab_size}); use sampler=hf")
        suppressed = set(model.generation_config.suppress_tokens or []) | set(range(vocab_size, rows))
        model.generation_config.suppress_tokens = sorted(suppressed)


def repeat_per_example(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, examples: list[Example], n: int
                       ) -> tuple[torch.Tensor, torch.Tensor, list[Example]]:
    """Prompts ``[B, P]`` and examples repeated for ``n`` samples each, grouped by example (rows ``[B·n, P]``)."""
    if n == 1:
        return prompt_ids, prompt_mask, list(examples)
    return (prompt_ids.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0),
            [ex for ex in examples for _ in range(n)])


class Sampler(Protocol):
    """Writes completions for prompts with the current student (the on-policy behaviour policy).

    What a sampler can do is declared here, so that the engine never probes for it: ``honours_suppress_tokens`` and
    :meth:`sync_weights` (a no-op for a sampler that reads the model's own weights).
    """

    max_new_tokens: int
    #: ``generate`` applies the model's ``generation_config.suppress_tokens`` (as a -inf logit). The trainer relies on
    #: it to keep a model with a padded output head from sampling ids past the vocabulary the two models share
    honours_suppress_tokens: bool

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Bring the sampler's copy of ``model``'s weights up to date after an optimizer step (a vLLM engine's); a
        sampler that generates with ``model`` itself has nothing to do."""
        ...

    def generate(self, model: torch.nn.Module, tokenizer, examples: list[Example], greedy: bool = False,
                 n: int | None = None) -> RolloutBatch:
        """Sample ``n`` completions per example (the sampler's ``n`` when None; one when ``greedy``); the batch's
        rows and ``examples`` are grouped by example: ``[e0, e0, ..., e1, e1, ...]``."""
        ...
