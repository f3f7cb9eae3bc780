"""The one place that picks how a micro-batch's loss is computed, from what the method reads and the teacher gives.

Paths (``LossPath.teacher_output``):
  * ``"logits"``: both models' full ``[B, T, V]`` logits -> ``method.loss`` (every method; also teacher-free ones);
  * ``"hidden"``: final hidden states and output heads, ``chunk_size`` positions of logits at a time
    (:func:`opd.losses.chunked.chunked_divergence_loss` of the method's :meth:`~opd.methods.base.Method.token_divergence`,
    then ``method.divergence_loss``): methods whose loss is a per-token divergence, local teachers with a linear head;
  * ``"sparse"``: the teacher's top-k log-probs (``teacher.kind: vllm_server``) -> ``method.loss``;
  * ``"retokenized"``: the teacher on the completion texts in its own tokenization, aligned by bytes
    (:class:`opd.types.RetokenizedTeacher`) -> ``method.loss``: the cross-tokenizer methods.

:func:`check_pair` refuses a method and teacher that cannot work together, in one line, before any model loads;
:func:`select_loss_path` then picks the path once the models are loaded (the chunked path needs their heads).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from opd.errors import ConfigError, TrainingError
from opd.losses.chunked import chunked_divergence_loss, resolve_loss_chunk_size
from opd.methods.base import LossOutput, Method
from opd.models.scoring import completion_hidden_states, completion_logits, linear_head, trim_vocabulary
from opd.teachers.base import Teacher
from opd.teachers.router import TeacherRouter, per_teacher_metrics
from opd.types import RolloutBatch


@dataclasses.dataclass(frozen=True)
class LossPath:
    """How the trainer computes each micro-batch's loss.

    Attributes:
        teacher_output: what is asked of the teacher: "logits", "hidden", "sparse", or None (the loss reads no teacher).
        chunk_size: positions of logits per chunk on the "hidden" path; 0 otherwise.
        share_prompts: the student runs a prompt that several rows repeat once (``trainer.share_prompts``).
    """

    teacher_output: str | None
    chunk_size: int = 0
    share_prompts: bool = False


def _name(method: Method) -> str:
    return method.registry_name


def check_pair(method: Method, teacher: Teacher | None) -> None:
    """Refuse, in one line, a method and a teacher that cannot work together (before any model loads).

    Raises:
        TrainingError: the method needs a teacher and there is none.
        ConfigError: the method samples from the teacher but the teacher is remote; or the method's loss cannot run
            from anything the teacher provides (naming the reason: full logits needed, β, temperature, top-k ...).
    """
    name = _name(method)
    if teacher is None:
        if method.needs_teacher or method.policy.uses_teacher:
            raise TrainingError(f"method {name!r} needs a teacher model, but teacher is null")
        return
    if method.policy.uses_teacher and not teacher.local:
        raise ConfigError(f"method {name!r} samples completions from the teacher ({type(method.policy).__name__}), which "
                          f"teacher kind {teacher.kind!r} cannot do; use a local teacher (teacher.kind=hf)")
    if not method.needs_teacher:
        return
    usable = [output for output in ("logits", "sparse", "retokenized") if output in teacher.provides]
    reasons = {output: method.teacher_input_blocker(output) for output in usable}
    if all(reasons.values()):
        raise ConfigError(f"method {name!r} cannot learn from teacher kind {teacher.kind!r}: "
                          f"{'; '.join(reason for reason in reasons.values())}")
    if "logits" not in usable and teacher.top_k < method.sparse_teacher_top_k():
        need = method.sparse_teacher_top_k()
        raise ConfigError(f"method {name!r} needs the teacher's top-{need} log-probs; set teacher.server_top_k >= {need} "
                          f"(got {teacher.top_k})")


def select_loss_path(method: Method, teacher: Teacher | None, student: torch.nn.Module, chunk_setting: int | None,
                     stacklevel: int = 3) -> LossPath:
    """The loss path for ``method`` with ``teacher`` (loaded) and ``student``, after :func:`check_pair`.

    Full logits unless the teacher is sparse-only (then "sparse"), or the method has a per-token divergence, both
    heads are plain linear layers and ``trainer.loss_chunk_size`` (``chunk_setting``: None = auto by vocabulary size,
    0 = off, N) asks for chunks (then "hidden"). An explicit chunk size that cannot be used is ignored with a warning.
    """
    check_pair(method, teacher)
    if method.needs_teacher and method.teacher_inputs == "retokenized":  # its own tokenization: no chunked path
        if chunk_setting:
            warnings.warn(f"trainer.loss_chunk_size={chunk_setting} ignored: method {_name(method)!r} reads the teacher "
                          "in its own tokenization; using full logits", UserWarning, stacklevel=stacklevel)
        return LossPath("retokenized")
    if not method.needs_teacher:
        output = None
    elif "logits" in teacher.provides:
        output = "logits"
    else:
        return LossPath("sparse")
    heads = [linear_head(student)] + ([linear_head(teacher.model)] if output else [])
    if output is None or method.teacher_input_blocker("hidden") or "hidden" not in teacher.provides \
            or any(head is None for head in heads):
        if chunk_setting:
            warnings.warn(f"trainer.loss_chunk_size={chunk_setting} ignored: method {_name(method)!r} or a model's output "
                          "head does not support the hidden-state loss; using full logits", UserWarning,
                          stacklevel=stacklevel)
        return LossPath(output)
    chunk_size = resolve_loss_chunk_size(chunk_setting, heads[0].out_features)
    return LossPath("hidden", chunk_size) if chunk_size else LossPath(output)


def path_loss(path: LossPath, method: Method, batch: RolloutBatch, student: torch.nn.Module, teacher: Teacher | None,
              tokenizer, vocab_size: int, num_tokens: int) -> LossOutput:
    """The method's loss on one micro-batch along ``path``.

    Args:
        student: the model being trained (the backend's ``train_model``: gradients flow).
        teacher: scored without gradient, under the method's teacher prompt (OPSD's privileged prompt) if it has one.
        tokenizer: the shared tokenizer (formats the teacher prompt).
        vocab_size: logits and heads are cut to the pair's shared rows.
        num_tokens: completion tokens of the whole optimizer step (the normaliser).
    """
    prompt = method.teacher_prompt(batch, tokenizer) if path.teacher_output else None
    if path.teacher_output == "hidden":
        teacher_head = teacher.score(batch, "hidden", prompt)
        student_head = completion_hidden_states(student, batch, share_prompts=path.share_prompts).first_rows(vocab_size)
        divergence = chunked_divergence_loss(student_head.hidden, student_head.weight, teacher_head.hidden,
                                             teacher_head.weight, batch.completion_mask, method.token_divergence,
                                             num_tokens, chunk_size=path.chunk_size, temperature=None,
                                             student_bias=student_head.bias, teacher_bias=teacher_head.bias)
        return method.divergence_loss(batch, divergence, None, num_tokens)
    if path.teacher_output == "sparse" and batch.teacher_scores is not None:  # the rollout worker asked the server
        teacher_out = batch.teacher_scores
    else:
        teacher_out = teacher.score(batch, path.teacher_output, prompt) if path.teacher_output else None
    logits = trim_vocabulary(completion_logits(student, batch, share_prompts=path.share_prompts), vocab_size)
    out = method.loss(batch, logits, teacher_out, num_tokens)
    if isinstance(teacher, TeacherRouter) and teacher_out is not None:  # tokens and loss per teacher
        out.metrics.update(per_teacher_metrics(teacher, method, batch, logits, teacher_out, num_tokens))
    return out

