"""Sampled-token (policy-gradient) pieces of on-policy distillation.

These work on per-token quantities of the sampled completion, shape ``[B, T]``: log-probabilities of
the sampled tokens y_t under the student q_θ and the teacher p_T, rewards, advantages, and a ``[B, T]``
mask that is 1 on real completion tokens. Outputs are per token, ``[B, T]``, with no reduction over
positions (:func:`opd.losses.divergences.masked_reduce` does that). Computation is in float32 at
least (bfloat16 inputs are promoted).

Sources: the sampled-token reverse-KL estimator with an importance-sampling policy gradient
(Thinking Machines, "On-Policy Distillation", Lu et al. 2025); MiniLLM (Gu et al., ICLR 2024,
arXiv:2306.08543) for discounted, length-normalised returns and whitened advantages; PPO clipping
(Schulman et al. 2017, arXiv:1707.06347).
"""

from __future__ import annotations

import torch


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sampled_log_ratio(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token reverse-KL estimate log q_θ(y_t) − log p_T(y_t) at the sampled tokens.

    With y_t ~ q_θ its expectation is the per-position reverse KL(q_θ‖p_T). Gradients are not stopped:
    to train on it, pass its negation (detached) as the advantage of :func:`policy_gradient_loss`.

    Args:
        student_logprobs: ``[B, T]`` log q_θ(y_t).
        teacher_logprobs: ``[B, T]`` log p_T(y_t).
    Returns:
        ``[B, T]``.
    """
    return _as_float(student_logprobs) - _as_float(teacher_logprobs)


def policy_gradient_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                         clip_eps: float | None = None, importance_weights: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Per-token importance-sampled policy-gradient surrogate, optionally PPO-clipped.

    ratio = exp(log q_θ − log q_old) · w, with the weights w (default 1), ``old_logprobs`` and the
    advantages A all treated as constants (detached here). Without clipping the loss is −A·ratio
    (the "importance_sampling" loss of the Thinking Machines recipe); with ``clip_eps`` = ε it is the
    PPO form max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε)), which passes no gradient once the ratio has
    left [1 − ε, 1 + ε] in the direction A favours. With ``old_logprobs = logprobs.detach()`` (and
    w = 1) the ratio is 1 and the gradient is exactly −A·∇log q_θ(y_t) (REINFORCE).

    Args:
        logprobs: ``[B, T]`` log q_θ(y_t) under the current policy (with gradient).
        old_logprobs: ``[B, T]`` log-probs of the policy that sampled y_t.
        advantages: ``[B, T]`` per-token advantages.
        clip_eps: PPO clip range ε > 0, or None for no clipping.
        importance_weights: ``[B, T]`` extra per-token weights (e.g. MiniLLM's q_θ/p̃ for teacher-mixed
            sampling), or None.
    Returns:
        ``[B, T]`` per-token loss.
    """
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    adv = _as_float(advantages.detach())
    ratio = torch.exp(_as_float(logprobs) - _as_float(old_logprobs.detach()))
    if importance_weights is not None:
        ratio = ratio * _as_float(importance_weights.detach())
    loss = -adv * ratio
    if clip_eps is None:
        return loss
    return torch.maximum(loss, -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, length_normalize: bool = False,
                       include_current: bool = True) -> torch.Tensor:
    """Discounted reward-to-go G_t = Σ_{t' ≥ t, mask} γ^{t'−t} r_{t'} over real tokens, by a reverse scan.

    MiniLLM (Gu et al. 2024) Eq. 6 uses R_{t+1} = Σ_{t' > t} r_{t'} (``include_current=False``), while its
    official code includes r_t and uses γ = 0.95 (``include_current=True``, the default here). Rewards
    at masked positions are zeroed, so padding never leaks into the returns; a masked gap inside a row
    adds nothing but does not cut the sum (exponents count positions). With ``length_normalize`` the
    return is divided by the number of real tokens it sums (T_i − t for a right-padded row with
    ``include_current``), or left at 0 when there are none: never a division by 0.

    Args:
        rewards: ``[B, T]`` per-token rewards r_t.
        mask: ``[B, T]`` 1 on real tokens.
        gamma: discount γ in [0, 1].
        length_normalize: divide by the number of real tokens in the sum.
        include_current: G_t includes r_t (True) or is R_{t+1}, the sum over t' > t with γ^{t'−t−1} (False).
    Returns:
        ``[B, T]``, 0 at masked positions.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    real = mask.bool()
    r = torch.where(real, _as_float(rewards), 0.0)
    n = real.to(r.dtype)
    carry, count = torch.zeros_like(r[..., 0]), torch.zeros_like(r[..., 0])
    sums, counts = [], []
    for t in reversed(range(r.shape[-1])):
        if include_current:
            carry, count = r[..., t] + gamma * carry, count + n[..., t]
            sums.append(carry), counts.append(count)
        else:
            sums.append(carry), counts.append(count)
            carry, count = r[..., t] + gamma * carry, count + n[..., t]
    returns = torch.stack(sums[::-1], dim=-1)
    if length_normalize:
        returns = returns / torch.stack(counts[::-1], dim=-1).clamp(min=1)
    return torch.where(real, returns, 0.0)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
                  ) -> torch.Tensor:
    """Whiten ``values`` with the mean and (population) standard deviation of the masked entries only.

    Global advantage whitening as in MiniLLM's code. Returns (x − μ)/√(σ² + eps), or x/√(σ² + eps)
    with ``shift_mean=False`` (scale only, signs kept). An empty mask gives all zeros.

    Args:
        values: ``[B, T]``.
        mask: ``[B, T]`` 1 where the entry counts.
        shift_mean: subtract the masked mean.
        eps: added to the variance.
    Returns:
        ``[B, T]``, 0 at masked positions.
    """
    real = mask.bool()
    x = _as_float(values)
    n = real.sum().clamp(min=1)
    mean = torch.where(real, x, 0.0).sum() / n
    centered = torch.where(real, x - mean, 0.0)
    var = centered.pow(2).sum() / n
    return (centered if shift_mean else torch.where(real, x, 0.0)) * torch.rsqrt(var + eps)
