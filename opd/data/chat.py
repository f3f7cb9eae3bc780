"""Prompts through the tokenizer's chat template (``student.chat_template: true``, for instruct models).

Teacher and student score every completion under the same prompt tokens: they share one tokenizer,
and the prompt is formatted once, here, before any sampler, teacher or evaluation sees it. A teacher
conditioned on another template than the student's would hand out log-probabilities of another
context, which biases every divergence (so the trainer refuses a teacher and a student whose
``chat_template`` settings differ).
"""

from __future__ import annotations

import dataclasses

from opd.data.base import Task
from opd.errors import ConfigError
from opd.types import Example


def chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn of ``tokenizer``'s chat template, ending with the assistant's header.

    Args:
        tokenizer: a Hugging Face tokenizer with a ``chat_template``.
        prompt: the task's plain prompt.
    Returns:
        The formatted text (special tokens written out; the tokenizer maps them to their ids).
    """
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def apply_chat_template(task: Task, tokenizer) -> None:
    """Rewrite every prompt of ``task`` (train, eval and validation splits) in place with :func:`chat_prompt`.

    Raises:
        ConfigError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("student.chat_template=true but the student's tokenizer has no chat template; "
                          "set student.chat_template=false (and teacher.chat_template=false)")
    cache: dict[str, str] = {}

    def formatted(example: Example) -> Example:
        if example.prompt not in cache:
            cache[example.prompt] = chat_prompt(tokenizer, example.prompt)
        return dataclasses.replace(example, prompt=cache[example.prompt], plain_prompt=example.plain_prompt or example.prompt)

    task.train = [formatted(ex) for ex in task.train]
    task.eval = [formatted(ex) for ex in task.eval]
    if task.validation:
        task.validation = [formatted(ex) for ex in task.validation]
