"""Pieces shared by several methods (no method is registered here): the completion cross-entropy, and
what the sampled-token and token-selecting OPD methods share.

Temperature convention of the policy-gradient methods (minillm, tm_opd, eopd, reopold, aopd): the
policy being trained is the distribution the completions were sampled from, so the current and the
old log-probabilities of a sampled token, log q_θ(y_t) and log q_old(y_t), are both taken at the
batch's sampling temperature (``batch.temperature``); then the importance ratio is exactly 1 on
fresh rollouts, as it should be with one update per rollout batch. A method's own ``temperature``
(the loss temperature) applies to the teacher and to every full-vocabulary divergence term.
Both are 1 by default, where the two conventions coincide. These log-probabilities are the untruncated
student's, so these methods refuse top-p/top-k truncated sampling at start-up
(``Method.uses_sampled_token_logprobs``, :meth:`opd.methods.base.Method.check_sampler`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from opd.data.chat import chat_prompt
from opd.errors import ConfigError
from opd.losses.divergences import masked_reduce
from opd.losses.topk import SPARSE_MODES, sparse_topk_forward_kl
from opd.models.scoring import token_logprobs
from opd.types import Example, RolloutBatch, SparseTeacherLogprobs

NORMALIZATIONS = ("kept", "all")


def completion_cross_entropy(batch: RolloutBatch, student_logits: torch.Tensor, num_tokens: int,
                             label_smoothing: float = 0.0) -> torch.Tensor:
    """Token-level cross-entropy of the student on the batch's completion tokens, normalised by ``num_tokens``.

    Args:
        student_logits: ``[B, T, V]`` logits at the completion positions.
    Returns:
        A scalar: the masked sum over ``[B, T]`` divided by ``num_tokens`` (the step's completion-token count).
    """
    per_token = F.cross_entropy(student_logits.float().transpose(1, 2), batch.completion_ids, reduction="none",
                                label_smoothing=label_smoothing)
    return masked_reduce(per_token, batch.completion_mask, num_tokens)


def behaviour_logprobs(batch: RolloutBatch, student_logits: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` detached log q_old(y_t): the student's log-probability of each sampled token when it was sampled.

    The sampler's record (``batch.sampler_logprobs``) when the behaviour policy kept one, else the
    student's current logits at the batch's sampling temperature: with one update per rollout batch
    the student that is scored now is the one that sampled.

    Args:
        batch: the rollouts.
        student_logits: ``[B, T, V]`` student logits at completion positions.
    """
    if batch.sampler_logprobs is not None:
        return batch.sampler_logprobs.detach().float()
    return token_logprobs(student_logits.detach(), batch.completion_ids, batch.temperature)


def policy_logprobs(batch: RolloutBatch, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q_θ(y_t), log q_old(y_t))``, both ``[B, T]`` at the sampling temperature; the first has gradient.

    At masked (padding) positions q_old is replaced by the detached current value, so the ratio there
    is 1: a padding token's sampler log-probability can never produce an infinite ratio whose
    zero-weighted gradient would still be NaN.
    """
    logq = token_logprobs(student_logits, batch.completion_ids, batch.temperature)
    old = behaviour_logprobs(batch, student_logits)
    return logq, torch.where(batch.completion_mask.bool(), old, logq.detach())


def reward_logprobs(batch: RolloutBatch, logq: torch.Tensor, logq_old: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` detached log q(y_t), the student's side of a sampled-token reward such as log p_T(y_t) − log q(y_t).

    On a fresh batch the behaviour log-probs q_old (the sampler's record, as the recipes use them). On a stale one
    (``batch.staleness > 0``, ``trainer.max_staleness``) the current student's: the importance ratio
    q_θ/q_old re-weights the samples to the current policy, and the reverse KL it estimates, E_{q_θ}[log q_θ − log
    p_T], is the current student's, so its log q must be too (the AsyncOPD study: reverse KL tolerates staleness
    only when the student's side is recomputed at learner time).

    Args:
        logq, logq_old: ``[B, T]`` from :func:`policy_logprobs`.
    """
    return logq.detach().float() if batch.staleness > 0 else logq_old


def mix_with_cross_entropy(batch: RolloutBatch, student_logits: torch.Tensor, distil: torch.Tensor, ce_weight: float,
                            num_tokens: int, metrics: dict[str, float]) -> torch.Tensor:
    """``(1 − w)·distil + w·CE`` (KD's and DistiLLM's hard-label term); the CE goes into ``metrics["loss/ce"]`` when w > 0.

    Args:
        distil: the scalar distillation term, already normalised by ``num_tokens``.
        ce_weight: w in [0, 1].
    """
    loss = (1.0 - ce_weight) * distil
    if ce_weight > 0:
        ce = completion_cross_entropy(batch, student_logits, num_tokens)
        metrics["loss/ce"] = ce.item()
        loss = loss + ce_weight * ce
    return loss


def server_temperature_blocker(temperature: float) -> str | None:
    """Why a method that reads log p_T(y_t) cannot use a teacher server at ``temperature`` (its log-probs are at 1)."""
    if temperature != 1.0:
        return f"method.temperature={temperature}: server log-probs are at temperature 1"
    return None


def teacher_token_logprobs(teacher: torch.Tensor | SparseTeacherLogprobs, tokens: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` log p_T(y_t) at ``temperature``, from full teacher logits ``[B, T, V]`` or a sparse teacher output.

    A sparse output (a vLLM server's prompt log-probs) is at temperature 1 and holds the exact
    sampled-token log-prob; another temperature would need the full distribution's normaliser.
    """
    if isinstance(teacher, SparseTeacherLogprobs):
        if temperature != 1.0:
            raise ValueError(f"sparse teacher log-probs are at temperature 1, not {temperature}")
        return teacher.token_logprobs
    return token_logprobs(teacher, tokens, temperature)


def sparse_forward_kl(student_logits: torch.Tensor, teacher: SparseTeacherLogprobs, mode: str,
                      temperature: float = 1.0) -> torch.Tensor:
    """``[B, T]`` forward KL(T‖S) on the teacher's top-k (:func:`opd.losses.topk.sparse_topk_forward_kl`).

    The teacher's log-probs are at temperature 1. In ``"renorm"`` mode any loss temperature τ is
    exact: the teacher renormalised on its top-k at τ is softmax_k(log p_T / τ), which needs no
    normaliser over the vocabulary (the top-k set itself does not depend on τ). ``"tail"`` needs τ = 1.

    Args:
        student_logits: ``[B, T, V]``.
        teacher: the server's top-k (k >= 1).
        mode: "tail" (k + 1 buckets; the full forward KL at k = V) or "renorm".
        temperature: loss temperature τ.
    """
    check_choice("sparse_mode", mode, SPARSE_MODES)
    if mode == "tail" and temperature != 1.0:
        raise ValueError(f"sparse_mode 'tail' needs temperature 1 (sparse teacher log-probs are at 1), got {temperature}")
    return sparse_topk_forward_kl(student_logits, teacher.topk_logprobs / temperature, teacher.topk_ids, mode,
                                  temperature)


def sparse_mode_blocker(mode: str, temperature: float) -> str | None:
    """Why a forward-KL method cannot run from sparse teacher log-probs at ``temperature``, or None."""
    if temperature != 1.0 and mode != "renorm":
        return (f"method.temperature={temperature} needs method.sparse_mode=renorm (server log-probs are at "
                f"temperature 1; only the top-k-renormalised KL can be re-tempered exactly)")
    return None


def top_fraction_mask(scores: torch.Tensor, mask: torch.Tensor, fraction: float, per_sequence: bool) -> torch.Tensor:
    """``[B, T]`` bool: the ⌊fraction·m⌋ (at least 1) highest-scoring masked positions.

    m counts the real positions of each row (``per_sequence``) or of the whole batch. Ties keep the
    earlier position. A row (or batch) without real positions keeps nothing.

    Args:
        scores: ``[B, T]`` selection scores (no gradient needed).
        mask: ``[B, T]`` 1 on real positions.
        fraction: kept fraction in (0, 1].
        per_sequence: select within each row, or over all real positions of the batch.
    """
    real = mask.bool()
    flat = not per_sequence
    s = scores.detach().float().masked_fill(~real, float("-inf"))
    r = real
    if flat:
        s, r = s.reshape(1, -1), r.reshape(1, -1)
    m = r.sum(dim=1)
    # the small epsilon keeps floor(0.29 * 100) at 29 despite float rounding
    n = torch.where(m > 0, torch.floor(fraction * m.double() + 1e-9).long().clamp(min=1), torch.zeros_like(m))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    keep = (rank < n[:, None]) & r
    return keep.reshape(mask.shape)


def selected_mean(values: torch.Tensor, keep: torch.Tensor, num_tokens: int, fraction: float, normalize: str
                  ) -> torch.Tensor:
    """Sum of ``values`` over the kept positions, divided by ``num_tokens·fraction`` ("kept") or ``num_tokens`` ("all").

    "kept" approximates the mean over the kept tokens of the whole optimizer step (exact up to the
    floor and at-least-one rounding of the per-sequence selection): the method only sees the step's
    total completion-token count, not how many tokens the other micro-batches keep. "all" is the
    token mean over all completion tokens, dropped tokens counting as 0.
    """
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    denom = num_tokens * (fraction if normalize == "kept" else 1.0)
    return total / max(denom, 1e-12)  # no tokens: total is 0


def check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    """ValueError unless ``value`` > 0 (or None where allowed)."""
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{name} must be > 0{' or null' if allow_none else ''}, got {value}")


def check_unit(name: str, value: float, low_open: bool = False, high_open: bool = False) -> None:
    """ValueError unless ``value`` is in [0, 1] (with the chosen ends open)."""
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_k_fits(k: int, vocab_size: int) -> None:
    """The top-K support must fit the vocabulary; only known at the first loss (it is not a config value)."""
    if k > vocab_size:
        raise ValueError(f"method.k = {k} exceeds the vocabulary size V = {vocab_size}; set method.k <= {vocab_size}")



#: a placeholder of a self-teacher's template: ``{name}`` (other braces, e.g. ``\\boxed{}``, are kept as they are)
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
#: stands in for the user's message when the chat template is rendered around it (a private-use character)
_SENTINEL = "\ue000"


def chat_user_message(tokenizer, prompt: str) -> str | None:
    """The user's message in ``prompt`` when ``prompt`` is exactly one user turn of ``tokenizer``'s chat template
    (``opd.data.chat.chat_prompt``: system header, user turn, assistant header), else None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    head, found, tail = chat_prompt(tokenizer, _SENTINEL).partition(_SENTINEL)
    if not found or len(prompt) < len(head) + len(tail) or not (prompt.startswith(head) and prompt.endswith(tail)):
        return None
    message = prompt[len(head):len(prompt) - len(tail)]
    return message if chat_prompt(tokenizer, message) == prompt else None


def check_template(name: str, template: str, required: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    """ValueError unless ``template`` holds every ``{placeholder}`` of ``required`` and no other of its own."""
    for placeholder in required:
        if "{" + placeholder + "}" not in template:
            raise ValueError(f"{name} must contain the placeholder {{{placeholder}}}, got {template!r}")
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                         f"known: {', '.join('{' + a + '}' for a in allowed)}")


def privileged_prompt(template: str, example: Example, values: dict[str, str], tokenizer, chat_turn: bool) -> str:
    """A self-teacher's prompt text: ``template`` filled in one pass (so filled text containing "{prompt}" stays
    literal) with ``{prompt}`` (the problem as the student sees it) and ``values``.

    With ``chat_turn`` the filled template is the user turn of the tokenizer's chat template and ``{prompt}`` the
    student's user message (its prompt without the chat template around it), as OPSD's ``data_collator.py`` and TRL's
    self-distillation trainers build it.

    Raises:
        ConfigError: ``chat_turn`` without a tokenizer, or with a prompt that is not one user turn of its chat template.
    """
    prompt = example.prompt
    if chat_turn:
        if tokenizer is None:
            raise ConfigError("method.chat_turn=true: the teacher's prompt needs the tokenizer's chat template")
        prompt = chat_user_message(tokenizer, example.prompt)
        if prompt is None:
            raise ConfigError("method.chat_turn=true needs prompts that are one user turn of the tokenizer's chat "
                              f"template (student.chat_template=true); got {example.prompt[:80]!r}")
    filled = {"prompt": prompt, **values}
    text = _PLACEHOLDER.sub(lambda match: filled.get(match.group(1), match.group(0)), template)
    return chat_prompt(tokenizer, text) if chat_turn else text
