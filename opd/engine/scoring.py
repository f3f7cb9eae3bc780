"""Kept for imports from scripts and tests: the scoring forward passes live in :mod:`opd.models.scoring`, where methods
and teachers can use them without importing the engine (issue 14's layering)."""

from opd.models.scoring import completion_logits, token_logprobs

__all__ = ["completion_logits", "token_logprobs"]
