"""Tasks: prompts, reference completions and answer checking. Importing registers them."""

from opd.data import arithmetic, hub, jsonl  # noqa: F401  (registration)
from opd.data.base import Example, PromptIterator, Task

__all__ = ["Example", "PromptIterator", "Task"]
