"""Top-k and sampled-token estimators against independent float64 references and identities."""

from __future__ import annotations

import pytest
import torch

from opd.losses.divergences import forward_kl, reverse_kl
from opd.losses.sampled import discounted_returns, masked_whiten, policy_gradient_loss, sampled_log_ratio
from opd.losses.topk import sparse_topk_forward_kl, topk_forward_kl, topk_reverse_kl

V = 9


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, V, generator=g) * 2, torch.randn(3, 4, V, generator=g) * 2


def ref_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, -1)


def ref_support(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[..., V]`` mask of the k largest entries (by sorting, not topk)."""
    order = probs.argsort(dim=-1, descending=True)[..., :k]
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, True)


def ref_truncated_kl(p: torch.Tensor, q: torch.Tensor, support: torch.Tensor, mode: str) -> torch.Tensor:
    """Float64 KL(P‖Q) on ``support`` written out per mode: renorm, tail ((k+1) buckets) or raw."""
    p_s, q_s = p * support, q * support
    if mode == "renorm":
        p_s, q_s = p_s / p_s.sum(-1, keepdim=True), q_s / q_s.sum(-1, keepdim=True)
    terms = torch.where(support, p_s * (p_s.log() - q_s.log()), torch.zeros_like(p))
    total = terms.sum(-1)
    if mode == "tail":
        p_tail, q_tail = (p * ~support).sum(-1), (q * ~support).sum(-1)  # the (k+1)-th bucket
        total = total + torch.where(p_tail > 0, p_tail * (p_tail.log() - q_tail.log()), torch.zeros_like(p_tail))
    return total


# ---- top-k ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["renorm", "tail"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_k_equal_to_vocab_is_the_full_kl(logits, mode, temperature):
    s, t = logits
    torch.testing.assert_close(topk_forward_kl(s, t, V, mode, temperature), forward_kl(s, t, temperature),
                               rtol=1e-5, atol=1e-5)
    for support in ("student", "teacher"):
        torch.testing.assert_close(topk_reverse_kl(s, t, V, mode, support, temperature), reverse_kl(s, t, temperature),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["renorm", "tail", "raw"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_kls_match_reference(logits, mode, k):
    s, t = logits
    ps, pt = ref_probs(s, 0.8), ref_probs(t, 0.8)
    torch.testing.assert_close(topk_forward_kl(s, t, k, mode, 0.8).double(),
                               ref_truncated_kl(pt, ps, ref_support(pt, k), mode), rtol=1e-5, atol=1e-5)
    for support, probs in (("student", ps), ("teacher", pt)):
        torch.testing.assert_close(topk_reverse_kl(s, t, k, mode, support, 0.8).double(),
                                   ref_truncated_kl(ps, pt, ref_support(probs, k), mode), rtol=1e-5, atol=1e-5)


def test_raw_is_biased_and_renorm_tail_are_nonnegative(logits):
    s, t = logits
    sharp = torch.tensor([[3.0, 1.0, 0.0, -1.0]])  # a model more confident on the other's top tokens
    assert topk_forward_kl(sharp, sharp / 3, 2, "raw") < 0  # a partial sum of KL terms can be negative
    assert topk_reverse_kl(sharp / 3, sharp, 2, "raw") < 0
    for mode in ("renorm", "tail"):
        assert (topk_forward_kl(s, t, 3, mode) >= -1e-6).all()
        assert (topk_reverse_kl(s, t, 3, mode) >= -1e-6).all()
        assert topk_reverse_kl(s, s, 3, mode).abs().max() < 1e-6


@pytest.mark.parametrize("support", ["student", "teacher"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_stopgrad_drops_exactly_the_plus_one_term(logits, support, temperature):
    s, t = logits
    k = 3
    grads = {}
    for mode in ("raw", "stopgrad"):
        x = s.clone().requires_grad_(True)
        value = topk_reverse_kl(x, t, k, mode, support, temperature)
        value.sum().backward()
        grads[mode], grads[mode + "_value"] = x.grad.double(), value.detach()
    torch.testing.assert_close(grads["raw_value"], grads["stopgrad_value"])

    # independent: d S(v)/d z_j = S(v)(δ_vj − S(j)) / τ, with z the student logits
    ps, pt = ref_probs(s, temperature), ref_probs(t, temperature)
    in_s = ref_support(ps if support == "student" else pt, k).double()
    c = (ps.log() - pt.log()) * in_s  # log S − log T on the support, 0 elsewhere
    stopgrad_ref = (ps * c - ps * (ps * c).sum(-1, keepdim=True)) / temperature  # Σ_S ∇S(v)·(log S − log T)
    plus_one = (ps * in_s - ps * (ps * in_s).sum(-1, keepdim=True)) / temperature  # Σ_S ∇S(v)·1
    torch.testing.assert_close(grads["stopgrad"], stopgrad_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads["raw"] - grads["stopgrad"], plus_one, rtol=1e-4, atol=1e-6)
    assert plus_one.abs().max() > 1e-3  # the bias is real on a truncated support


def test_stopgrad_with_full_support_has_the_reverse_kl_gradient(logits):
    s, t = logits
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    topk_reverse_kl(x1, t, V, "stopgrad").sum().backward()
    reverse_kl(x2, t).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["renorm", "tail"])
@pytest.mark.parametrize("k", [1, 4, V])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_equals_dense(logits, mode, k, temperature):
    s, t = logits
    top = torch.log_softmax(t / temperature, -1).topk(k, dim=-1)  # what a server returns at that temperature
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    sparse = sparse_topk_forward_kl(x1, top.values, top.indices, mode, temperature)
    dense = topk_forward_kl(x2, t, k, mode, temperature)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=2e-6)
    sparse.sum().backward(), dense.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_masked_vocabulary_entries_are_safe():
    s = torch.tensor([[1.0, 2.0, float("-inf"), 0.0, -1.0]])
    t = torch.tensor([[0.0, 1.0, float("-inf"), 3.0, -2.0]])
    calls = [lambda a, b, k, m: topk_forward_kl(a, b, k, m)]
    calls += [lambda a, b, k, m, sup=sup: topk_reverse_kl(a, b, k, m, sup) for sup in ("student", "teacher")]
    for k in range(1, 6):
        for mode in ("renorm", "tail", "raw", "stopgrad"):
            for i, call in enumerate(calls):
                if mode == "stopgrad" and i == 0:
                    continue
                x = s.clone().requires_grad_(True)
                value = call(x, t, k, mode)
                value.sum().backward()
                assert torch.isfinite(value).all() and torch.isfinite(x.grad).all(), (k, mode, i)
        top = torch.log_softmax(t, -1).topk(k, dim=-1)
        for mode in ("renorm", "tail"):
            x = s.clone().requires_grad_(True)
            value = sparse_topk_forward_kl(x, top.values, top.indices, mode)
            value.sum().backward()
            assert torch.isfinite(value).all() and torch.isfinite(x.grad).all(), (k, mode, "sparse")


def test_bad_arguments_raise(logits):
    s, t = logits
    top = torch.log_softmax(t, -1).topk(3, dim=-1)
    for k in (0, V + 1):
        with pytest.raises(ValueError, match="k must"):
            topk_forward_kl(s, t, k)
        with pytest.raises(ValueError, match="k must"):
            topk_reverse_kl(s, t, k)
    with pytest.raises(ValueError, match="mode"):
        topk_forward_kl(s, t, 3, mode="stopgrad")
    with pytest.raises(ValueError, match="mode"):
        topk_reverse_kl(s, t, 3, mode="bogus")
    with pytest.raises(ValueError, match="support"):
        topk_reverse_kl(s, t, 3, support="both")
    with pytest.raises(ValueError, match="mode"):
        sparse_topk_forward_kl(s, top.values, top.indices, mode="raw")
    with pytest.raises(ValueError, match="same shape"):
        sparse_topk_forward_kl(s, top.values[..., :2], top.indices)
    with pytest.raises(ValueError, match="temperature"):
        topk_forward_kl(s, t, 3, temperature=0.0)


# ---- sampled-token pieces -------------------------------------------------------------------------------------------


def test_sampled_log_ratio_is_an_unbiased_reverse_kl_estimate():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    n = 100_000
    y = torch.multinomial(log_q.exp(), n, replacement=True, generator=g)  # [3, n], y ~ q
    estimate = sampled_log_ratio(log_q.gather(-1, y), log_p.gather(-1, y)).mean(-1)
    torch.testing.assert_close(estimate, reverse_kl(s, t), rtol=0, atol=0.02)


def test_policy_gradient_with_detached_old_logprobs_is_reinforce():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 7, generator=g)
    y = torch.randint(0, 7, (2, 6), generator=g)
    adv = torch.randn(2, 6, generator=g)
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    lp = torch.log_softmax(x1, -1).gather(-1, y[..., None])[..., 0]
    loss = policy_gradient_loss(lp, lp.detach(), adv)
    torch.testing.assert_close(loss, -adv)
    loss.sum().backward()
    (-adv * torch.log_softmax(x2, -1).gather(-1, y[..., None])[..., 0]).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_policy_gradient_expectation_is_the_reverse_kl_gradient():
    """Σ_y q(y)·∇loss(y) with A = −(log q − log p) equals ∇KL(q‖p), by exact enumeration of y."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    log_q, log_p = torch.log_softmax(x1, -1), torch.log_softmax(t, -1)
    adv = -sampled_log_ratio(log_q, log_p).detach()  # every token y of the vocabulary, [4, 6]
    loss = policy_gradient_loss(log_q, log_q.detach(), adv)
    (log_q.exp().detach() * loss).sum().backward()
    reverse_kl(x2, t).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_ppo_clipping_zeroes_the_gradient_only_past_the_favoured_bound():
    ratios = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    x = ratios.log().requires_grad_(True)
    weights = torch.ones(6, requires_grad=True)
    loss = policy_gradient_loss(x, torch.zeros(6), adv, clip_eps=0.2, importance_weights=weights)
    loss.sum().backward()
    # A > 0: ratio above 1 + ε is capped (no gradient), below 1 − ε still pushed up; A < 0: the mirror image
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, -1.0, 0.0, 0.0, 1.0, 1.5]))
    torch.testing.assert_close(loss, torch.tensor([-0.5, -1.0, -1.2, 0.8, 1.0, 1.5]))
    assert weights.grad is None  # importance weights are constants
    unclipped = policy_gradient_loss(x, torch.zeros(6), adv, importance_weights=torch.full((6,), 2.0))
    torch.testing.assert_close(unclipped, -adv * ratios * 2)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_gradient_loss(x, torch.zeros(6), adv, clip_eps=0.0)


def ref_returns(rewards, mask, gamma, length_normalize, include_current):
    """G_t by a double loop over real tokens."""
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        for t in range(rewards.shape[1]):
            if not mask[b, t]:
                continue
            start = t if include_current else t + 1
            real = [u for u in range(start, rewards.shape[1]) if mask[b, u]]
            total = sum(gamma ** (u - start) * float(rewards[b, u]) for u in real)
            out[b, t] = total / len(real) if length_normalize and real else total
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.5])
@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("include_current", [True, False])
def test_discounted_returns_match_a_hand_loop(gamma, length_normalize, include_current):
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1],   # full
                         [1, 1, 1, 0, 0, 0],   # right padding
                         [0, 0, 0, 0, 0, 0],   # empty row
                         [1, 0, 0, 0, 0, 0],   # one token
                         [0, 1, 1, 0, 1, 0]])  # prompt and a gap
    rewards = torch.randn(5, 6, generator=g).masked_fill(mask == 0, float("nan"))  # padding must never leak
    got = discounted_returns(rewards, mask, gamma, length_normalize, include_current)
    assert torch.isfinite(got).all() and (got[mask == 0] == 0).all()
    torch.testing.assert_close(got.double(), ref_returns(rewards, mask, gamma, length_normalize, include_current),
                               rtol=1e-5, atol=1e-6)


def test_discounted_returns_minillm_code_normalisation():
    rewards, mask = torch.ones(1, 4), torch.tensor([[1, 1, 1, 0]])
    # γ = 1 and r = 1: Σ_{t' ≥ t} r = T − t, divided by the T − t remaining real tokens, is 1 everywhere
    torch.testing.assert_close(discounted_returns(rewards, mask, length_normalize=True), torch.tensor([[1.0, 1, 1, 0]]))
    torch.testing.assert_close(discounted_returns(rewards, mask, include_current=False), torch.tensor([[2.0, 1, 0, 0]]))
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(rewards, mask, gamma=1.5)


def test_masked_whiten():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(4, 7, generator=g) * 3 + 5
    mask = torch.rand(4, 7, generator=g) > 0.4
    white = masked_whiten(values, mask)
    assert (white[~mask] == 0).all()
    torch.testing.assert_close(white[mask].mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(white[mask].std(unbiased=False), torch.tensor(1.0), rtol=0, atol=1e-5)
    scaled = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(scaled[mask], values[mask] / values[mask].std(unbiased=False), rtol=1e-5, atol=1e-6)
    empty = masked_whiten(values, torch.zeros_like(mask))
    assert torch.equal(empty, torch.zeros_like(values))
