"""Several named teachers (``teachers:``): each example is scored by the teacher named by its data source.

Multi-teacher on-policy distillation as in NeMo-RL and verl's ``teacher_key``: specialist teachers merged into one
student, every row of a batch routed by ``Example.source`` (``data=mixture`` tags each example with its task). The
teachers may be of different kinds (one local, one served): the loss path is then the sparse one, the local teachers
giving their top-k as a server would (:meth:`SparseTeacherLogprobs.from_logits`, k = the smallest served k).

Not a registered kind: :func:`build_router` builds it from the ``teachers`` section. It has no single model, so it
cannot sample (SeqKD, MiniLLM, GKD's teacher-sampled batches are refused at start-up), gives no chunked path (the
teachers' hidden sizes differ), and the summary reports no teacher accuracy.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from opd.errors import ConfigError, TrainingError
from opd.teachers.base import Teacher
from opd.types import RolloutBatch, SparseTeacherLogprobs


class TeacherRouter(Teacher):
    """Named teachers; row ``i`` of a batch goes to ``teachers[batch.examples[i].source]``.

    Args:
        teachers: name -> teacher (built, not loaded); a name is a data source.
    """

    local = False  # no single model to sample from or to evaluate
    kind = "router"  # type: ignore[assignment]

    def __init__(self, teachers: dict[str, Teacher]) -> None:
        super().__init__(cfg=dict(teachers))
        if not teachers:
            raise ConfigError("teachers: name at least one teacher")
        self.teachers = dict(teachers)
        members = list(self.teachers.values())
        if all("logits" in t.provides for t in members):
            self.provides = frozenset({"logits", "sparse"})
        else:  # a served teacher: everyone gives top-k
            self.provides = frozenset({"sparse"})
        self.top_k = min((t.top_k for t in members if "logits" not in t.provides), default=0)
        templates = {t.chat_template for t in members if t.chat_template is not None}
        if len(templates) > 1:
            raise ConfigError("teachers: every local teacher must have the same chat_template (they score the same "
                              "prompt tokens as the student)")
        self.chat_template = templates.pop() if templates else None

    def check(self) -> None:
        for teacher in self.teachers.values():
            teacher.check()

    def check_sources(self, sources: set[str]) -> None:
        """Every data source has a teacher (one line otherwise); a teacher with no source only warns (it would idle)."""
        missing = sorted(sources - set(self.teachers))
        if missing:
            hint = " (the data has no source field: use data=mixture)" if missing == [""] else ""
            raise ConfigError(f"teachers: examples of source {', '.join(map(repr, missing))} have no teacher{hint}; "
                              f"name a teacher after each source of the data (teachers: {', '.join(self.teachers)})")
        idle = sorted(set(self.teachers) - sources)
        if idle:
            import warnings

            warnings.warn(f"teachers {', '.join(idle)} get no training example (no data source of that name)",
                          UserWarning, stacklevel=3)

    def setup(self, student: torch.nn.Module, tokenizer, device: torch.device) -> int:
        self.vocab_size = min(t.setup(student, tokenizer, device) for t in self.teachers.values())
        for teacher in self.teachers.values():
            teacher.vocab_size = self.vocab_size
        return self.vocab_size

    def context_length(self) -> int | None:
        return min((n for t in self.teachers.values() if (n := t.context_length()) is not None), default=None)

    def route(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """Teacher name -> ``[R]`` long row indices of ``batch`` (every teacher, possibly with no rows)."""
        rows: dict[str, list[int]] = collections.defaultdict(list)
        for i, example in enumerate(batch.examples):
            if example.source not in self.teachers:
                raise TrainingError(f"an example of source {example.source!r} has no teacher "
                                    f"(teachers: {', '.join(self.teachers)})")
            rows[example.source].append(i)
        device = batch.completion_ids.device
        return {name: torch.tensor(rows[name], dtype=torch.long, device=device) for name in self.teachers}

    def score(self, batch: RolloutBatch, output: str, prompt: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        """Each routed teacher scores its rows (under the same rows of ``prompt``); the rows are put back in place."""
        if output not in self.provides:
            raise ValueError(f"teachers provide {sorted(self.provides)}, not {output!r}")
        parts = []
        for name, rows in self.route(batch).items():
            if not len(rows):
                continue
            teacher, sub = self.teachers[name], batch.select(rows)
            sub_prompt = None if prompt is None else tuple(x.index_select(0, rows) for x in prompt)
            if output == "logits":
                parts.append((rows, teacher.score(sub, "logits", sub_prompt)))
            elif "sparse" in teacher.provides:
                parts.append((rows, teacher.score(sub, "sparse", sub_prompt).truncate(self.top_k)))
            else:  # a local teacher among served ones: its top-k, as a server would give it
                logits = teacher.score(sub, "logits", sub_prompt)
                parts.append((rows, SparseTeacherLogprobs.from_logits(logits, sub, self.top_k)))
        if output == "logits":
            first = parts[0][1]
            out = first.new_zeros((batch.completion_ids.shape[0], *first.shape[1:]))
            for rows, logits in parts:
                out[rows] = logits
            return out
        b, t = batch.completion_ids.shape
        out = SparseTeacherLogprobs(torch.zeros((b, t, self.top_k), dtype=torch.long, device=batch.completion_ids.device),
                                    torch.zeros((b, t, self.top_k), device=batch.completion_ids.device),
                                    torch.zeros((b, t), device=batch.completion_ids.device))
        for rows, part in parts:
            out.topk_ids[rows], out.topk_logprobs[rows], out.token_logprobs[rows] = \
                part.topk_ids, part.topk_logprobs.float(), part.token_logprobs.float()
        return out


def build_router(nodes: Any) -> TeacherRouter:
    """The ``teachers`` section (name -> teacher node, each checked against its kind's schema) as a router."""
    from opd.teachers import build_teacher

    return TeacherRouter({str(name): build_teacher(node) for name, node in nodes.items()})


def per_teacher_metrics(router: TeacherRouter, method, batch: RolloutBatch, student_logits: torch.Tensor,
                        teacher_out: Any, num_tokens: int) -> dict[str, float]:
    """``teacher/<name>/tokens`` (completion tokens routed to it) and ``teacher/<name>/loss_share`` (the method's loss
    on its rows alone, normalised by the step's ``num_tokens``: additive over micro-batches and ranks, turned into a
    per-token mean by :func:`per_teacher_means`). Every teacher gets a row, so a starved one shows 0 tokens."""
    metrics = {}
    with torch.no_grad():
        for name, rows in router.route(batch).items():
            sub = batch.select(rows)
            metrics[f"teacher/{name}/tokens"] = float(sub.num_tokens)
            if sub.num_tokens:
                part = (teacher_out.select_rows(rows) if isinstance(teacher_out, SparseTeacherLogprobs)
                        else teacher_out.index_select(0, rows))
                loss = method.loss(sub, student_logits.detach().index_select(0, rows), part, num_tokens).loss
                metrics[f"teacher/{name}/loss_share"] = float(loss)
    return metrics


def per_teacher_means(metrics: dict[str, float], num_tokens: int) -> dict[str, float]:
    """``metrics`` with each ``teacher/<name>/loss_share`` replaced by ``teacher/<name>/loss``, the method's loss per
    completion token of that teacher's rows in the step (absent when it got no token)."""
    out = {}
    for key, value in metrics.items():
        if key.endswith("/loss_share"):
            tokens = metrics.get(key.replace("/loss_share", "/tokens"), 0.0)
            if tokens:
                out[key.replace("/loss_share", "/loss")] = value * num_tokens / tokens
        else:
            out[key] = value
    return out
