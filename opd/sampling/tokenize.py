"""Turning examples into token tensors, shared by every sampler and by dataset (off-policy) batches."""

from __future__ import annotations

import torch

from opd.types import Example, RolloutBatch


def encode_prompts(tokenizer, prompts: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, both ``[B, P]`` (the tokenizer adds BOS if it is set up to)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def left_pad(rows: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as left-padded ids and mask, both ``[B, max length]`` (prompts, as :func:`encode_prompts` pads)."""
    width = max(1, max(len(row) for row in rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


def encode_targets(tokenizer, examples: list[Example], device: torch.device | str = "cpu", source: str = "dataset",
                   targets: list[str] | None = None, completion_tokens: list[list[int]] | None = None,
                   finished: list[bool] | None = None) -> RolloutBatch:
    """A batch whose completions are given (reference solutions by default).

    Args:
        targets: completion texts, each followed by ``tokenizer.eos_token_id`` (always one of the ids every model
            stops at: ``opd.sampling.base.eos_token_ids``) and masked 1 up to and including it, as sampled
            rows are; ``example.target`` for each example when None.
        completion_tokens: completion token ids used as they are (e.g. replayed rollouts); overrides ``targets``.
        finished: per text, whether it ended (gets the EOS); False = a text cut at the length cap, left without an EOS
            as a sampled row cut there is. All True when None.
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [ex.prompt for ex in examples], device)
    if completion_tokens is not None:
        rows = [list(ids) or [tokenizer.eos_token_id] for ids in completion_tokens]
    else:
        texts = targets if targets is not None else [ex.target for ex in examples]
        ended = finished if finished is not None else [True] * len(texts)
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if end else [])
                for text, end in zip(texts, ended)]
        rows = [row or [tokenizer.eos_token_id] for row in rows]  # a row holds one token at least: an empty one, the EOS
    width = max(len(r) for r in rows)
    completion_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        completion_ids[i, : len(row)] = torch.tensor(row)
        completion_mask[i, : len(row)] = 1
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids.to(device), completion_mask.to(device), list(examples), source)
