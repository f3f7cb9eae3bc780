"""Tasks: prompts, reference completions and answer checking. Importing registers them."""

from opd.data import arithmetic, gym, hub, instruct, jsonl, math, mixture, multiplication  # noqa: F401  (registration; instruct, math: paper-table data)
from opd.data.base import PromptIterator, Task
from opd.types import Example

__all__ = ["Example", "PromptIterator", "Task"]
