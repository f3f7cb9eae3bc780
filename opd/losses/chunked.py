"""Full-vocabulary divergences without materialising full-vocabulary logits.

The plain path projects every completion position of both models to the vocabulary
(``logits = hidden @ W.T``), so a step holds ``[N, V]`` logits of the student *and* of the teacher,
plus the divergence's float32 intermediates and their gradients: for Qwen's V = 152k and N = 8k
tokens each ``[N, V]`` float32 tensor is 5 GB, and a JSD keeps a dozen of them alive for backward.

:func:`chunked_divergence_loss` computes the same masked token sum
``Σ_n mask_n · D(student_logits_n, teacher_logits_n) / num_tokens`` a chunk of positions at a time:

* for each chunk, the student's and the teacher's logits are projected (teacher without gradient),
  the divergence and its gradient with respect to the chunk's student logits ``g`` are computed with
  autograd, and the logits are dropped;
* the gradients with respect to the student's hidden states (``g @ W``, written into an ``[N, H]``
  buffer) and head weight (``g.T @ h``, accumulated in place into one ``[V, H]`` buffer) and bias are
  formed right away, in the forward pass;
* a custom :class:`torch.autograd.Function` keeps only those buffers for backward, which scales them
  by the incoming gradient. Nothing of size ``N × V`` outlives a chunk, so the extra memory is
  ``O(chunk_size × V + N × H + V × H)`` instead of ``O(N × V)``.

Positions with ``mask <= 0`` are never projected at all (the plain path computes and then discards them).

Ideas, not code, from: Liger Kernel's fused linear cross-entropy / fused linear JSD (Hsu et al. 2024,
arXiv:2410.10989), which compute the loss gradient during the forward pass chunk by chunk, and Cut
Cross-Entropy (Wijmans et al. 2024, arXiv:2411.09009) on never materialising the logits. The
alternative, recomputing each chunk's logits in backward with ``torch.utils.checkpoint``, costs one
more forward of every chunk (both matmuls and the divergence); ``benchmarks/bench_loss.py`` measures both.

The divergence can be any function ``(student_logits [c, V], teacher_logits [c, V], **kwargs) -> [c]``,
e.g. those of :mod:`opd.losses.divergences`; it is differentiated by autograd, so values and gradients
equal the plain path's up to floating-point summation order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

#: with ``chunk_size=None`` a chunk holds about this many logits per model (64 MiB in float32). A chunk's
#: divergence forward + backward keeps about 15 such [chunk, V] float32 tensors alive at once (~1 GiB).
AUTO_CHUNK_ELEMENTS = 1 << 24
#: ``trainer.loss_chunk_size: null`` switches to the chunked path above this vocabulary size.
AUTO_MIN_VOCAB = 32768


def auto_chunk_size(vocab_size: int, max_elements: int = AUTO_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk's ``[chunk, V]`` logits have about ``max_elements`` entries.

    A multiple of 32 between 32 and 4096: 512 at V = 32k, 96 at V = 152k. Smaller chunks were not
    slower on CPU (``benchmarks/RESULTS.md``); on a GPU a larger ``max_elements`` amortises kernel launches.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return int(min(4096, max(32, (max_elements // vocab_size) // 32 * 32)))


def resolve_loss_chunk_size(setting: int | None, vocab_size: int, min_vocab: int = AUTO_MIN_VOCAB) -> int:
    """The chunk size the trainer uses for ``trainer.loss_chunk_size``; 0 means the plain full-logits path.

    Args:
        setting: None = auto (chunked with :func:`auto_chunk_size` when ``vocab_size > min_vocab``,
            else plain), 0 = plain, N > 0 = chunked with N tokens per chunk.
        vocab_size: the models' vocabulary size (rows of the output embedding).
    """
    if setting is None:
        return auto_chunk_size(vocab_size) if vocab_size > min_vocab else 0
    if setting < 0:
        raise ValueError(f"loss_chunk_size must be >= 0 or None, got {setting}")
    return int(setting)


@dataclasses.dataclass
class _Spec:
    """The non-tensor arguments of one chunked loss."""

    divergence_fn: Callable[..., torch.Tensor]
    kwargs: dict[str, Any]
    chunk_size: int
    denominator: float


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate weight gradients over chunks in at least float32 (bfloat16 sums would lose bits)."""
    return torch.promote_types(dtype, torch.float32)


def _run_chunks(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, spec: _Spec,
                want: tuple[bool, bool, bool]):
    """Loss sum / denominator over all chunks, and (scaled) gradients for the inputs flagged in ``want``.

    All tensors are detached. ``s_hidden`` ``[N, H]``, ``t_hidden`` ``[N, H_t]``, ``mask`` ``[N]``.
    Returns ``(loss, grad_hidden [N, H] | None, grad_weight [V, H] | None, grad_bias [V] | None)``.
    """
    want_h, want_w, want_b = want
    rows = torch.nonzero(mask > 0).squeeze(1)
    weights = mask.index_select(0, rows)
    grad_h = torch.zeros_like(s_hidden) if want_h else None
    grad_w = torch.zeros(s_weight.shape, dtype=_grad_dtype(s_weight.dtype), device=s_weight.device) if want_w else None
    grad_b = torch.zeros(s_bias.shape, dtype=_grad_dtype(s_bias.dtype), device=s_bias.device) if want_b else None
    any_grad = want_h or want_w or want_b
    total = None
    # one (possibly empty) chunk when no position counts, so the result has the divergence's dtype
    for start in range(0, max(rows.numel(), 1), spec.chunk_size):
        idx = rows[start:start + spec.chunk_size]
        h = s_hidden.index_select(0, idx)
        t_logits = _project(t_hidden.index_select(0, idx), t_weight, t_bias)
        s_logits = _project(h, s_weight, s_bias)
        if any_grad:
            s_logits.requires_grad_(True)
            with torch.enable_grad():
                per = spec.divergence_fn(s_logits, t_logits, **spec.kwargs)
                del t_logits  # the divergence's graph keeps what its backward needs; free the rest before it runs
                chunk_sum = (per * weights[start:start + spec.chunk_size].to(per.dtype)).sum()
                (g,) = torch.autograd.grad(chunk_sum, s_logits)
            del s_logits, per
            if want_h:
                grad_h.index_copy_(0, idx, g @ s_weight)
            if want_w:
                if g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.T, h)
                else:  # low-precision matmul, float32 accumulation across chunks
                    grad_w.add_(g.T @ h)
            if want_b:
                grad_b.add_(g.sum(dim=0))
            del g
        else:
            per = spec.divergence_fn(s_logits, t_logits, **spec.kwargs)
            chunk_sum = (per * weights[start:start + spec.chunk_size].to(per.dtype)).sum()
            del s_logits, t_logits, per
        chunk_sum = chunk_sum.detach()
        total = chunk_sum if total is None else total + chunk_sum
    scale = 1.0 / spec.denominator
    for grad in (grad_h, grad_w, grad_b):
        if grad is not None:
            grad.mul_(scale)
    return total * scale, grad_h, grad_w, grad_b


class _ChunkedDivergence(torch.autograd.Function):
    """Loss and student gradients in forward, chunk by chunk; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, spec):
        want = (s_hidden.requires_grad, s_weight.requires_grad, s_bias is not None and s_bias.requires_grad)
        loss, grad_h, grad_w, grad_b = _run_chunks(s_hidden.detach(), s_weight.detach(),
                                                   None if s_bias is None else s_bias.detach(), t_hidden.detach(),
                                                   t_weight.detach(), None if t_bias is None else t_bias.detach(),
                                                   mask.detach(), spec, want)
        ctx.want = want
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype, None if s_bias is None else s_bias.dtype)
        # only gradient buffers are kept: [N, H], [V, H], [V] -- never anything of size N x V
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grads = []
        for wanted, dtype in zip(ctx.want, ctx.dtypes):
            if not wanted:
                grads.append(None)
                continue
            grad = next(saved)
            # in place: the saved buffer is released after backward, so no second [V, H] copy is made
            # (a second backward with retain_graph=True then fails autograd's version check instead of being wrong)
            grad = grad.mul_(grad_output.to(grad.dtype))
            grads.append(grad if grad.dtype == dtype else grad.to(dtype))
        return (*grads, None, None, None, None, None)


def chunked_divergence_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                            teacher_weight: torch.Tensor, mask: torch.Tensor, divergence_fn: Callable[..., torch.Tensor],
                            num_tokens: int | float | torch.Tensor | None = None, chunk_size: int | None = None,
                            temperature: float | None = 1.0, student_bias: torch.Tensor | None = None,
                            teacher_bias: torch.Tensor | None = None, **divergence_kwargs: Any) -> torch.Tensor:
    """``masked_reduce(divergence_fn(h_S @ W_S.T + b_S, h_T @ W_T.T + b_T, temperature=…, **kw), mask, num_tokens)``
    without ever holding more than ``chunk_size`` positions of logits.

    Values and gradients (with respect to ``student_hidden``, ``student_weight`` and ``student_bias``)
    equal the plain computation's up to summation order. The teacher side is treated as a constant
    (no gradient), as the trainer's teacher logits are. Tied heads need nothing special: autograd adds
    the head-weight gradient to the shared parameter's.

    Args:
        student_hidden: ``[..., H]`` student final hidden states.
        student_weight: ``[V, H]`` student output embedding.
        teacher_hidden: ``[..., H_t]`` teacher final hidden states at the same positions.
        teacher_weight: ``[V, H_t]`` teacher output embedding.
        mask: ``[...]`` weight of each position; positions with ``mask <= 0`` are skipped (never projected).
        divergence_fn: ``(student_logits [c, V], teacher_logits [c, V], **kw) -> [c]``, e.g.
            ``opd.losses.divergences.generalized_jsd``.
        num_tokens: the normaliser (completion tokens of the whole optimizer step); ``mask.sum()`` when None.
        chunk_size: positions per chunk; None = :func:`auto_chunk_size` of the vocabulary.
        temperature: passed to ``divergence_fn`` as ``temperature=``; None passes nothing.
        student_bias, teacher_bias: ``[V]`` output biases, if the heads have them.
        **divergence_kwargs: further keyword arguments of ``divergence_fn`` (``beta=``, ``alpha=``, ...).
    Returns:
        A scalar tensor. Its backward supports a single pass (no double backward, no ``retain_graph`` reuse).

    Memory: besides the inputs, ``O(chunk_size × V)`` for one chunk's logits and the divergence's
    intermediates, plus gradient buffers of the inputs' sizes (``[N, H]``, ``[V, H]`` in at least float32).
    """
    hidden_size, vocab_size = student_hidden.shape[-1], student_weight.shape[0]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden_size:
        raise ValueError(f"student_weight must be [V, {hidden_size}], got {tuple(student_weight.shape)}")
    if teacher_weight.dim() != 2 or teacher_weight.shape != (vocab_size, teacher_hidden.shape[-1]):
        raise ValueError(f"teacher_weight must be [{vocab_size}, {teacher_hidden.shape[-1]}] (same vocabulary as the "
                         f"student), got {tuple(teacher_weight.shape)}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or student_hidden.shape[:-1] != mask.shape:
        raise ValueError(f"positions differ: student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
                         f"{tuple(teacher_hidden.shape)}, mask {tuple(mask.shape)}")
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and bias.shape != (vocab_size,):
            raise ValueError(f"{name} must be [{vocab_size}], got {tuple(bias.shape)}")
    chunk_size = auto_chunk_size(vocab_size) if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    if num_tokens is None:
        num_tokens = mask.sum()
    denominator = max(float(num_tokens), 1.0)  # as masked_reduce: at least 1
    kwargs = dict(divergence_kwargs)
    if temperature is not None:
        kwargs["temperature"] = temperature
    spec = _Spec(divergence_fn, kwargs, chunk_size, denominator)

    s_hidden = student_hidden.reshape(-1, hidden_size)
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_mask = mask.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad
                                              or (student_bias is not None and student_bias.requires_grad))
    if not needs_grad:
        with torch.no_grad():
            return _run_chunks(s_hidden, student_weight, student_bias, t_hidden, teacher_weight, teacher_bias,
                               flat_mask, spec, (False, False, False))[0]
    return _ChunkedDivergence.apply(s_hidden, student_weight, student_bias, t_hidden, teacher_weight, teacher_bias,
                                    flat_mask, spec)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` cross-entropy of ``targets`` ``[B, T]`` under ``logits`` ``[B, T, V]`` (computed in float32)."""
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def chunked_token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """:func:`token_cross_entropy` of the logits ``hidden @ weight.T + bias`` without forming them at once.

    Args:
        hidden: ``[B, T, H]`` final hidden states; weight: ``[V, H]``; bias: ``[V]`` or None.
        targets: ``[B, T]`` token ids.
        chunk_size: positions projected to the vocabulary at a time (``[chunk_size, V]`` logits live at once).
    Returns:
        ``[B, T]`` float32.
    """
    flat, out = hidden.flatten(0, 1), []
    for start in range(0, flat.shape[0], chunk_size):
        logits = _project(flat[start : start + chunk_size], weight, bias).float()
        out.append(torch.nn.functional.cross_entropy(logits, targets.flatten()[start : start + chunk_size],
                                                     reduction="none"))
    return torch.cat(out).view_as(targets)
