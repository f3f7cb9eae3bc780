"""Divergences against an independent float64 reference, identities, masking and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from opd.losses.divergences import (
    clipped_forward_kl,
    entropy,
    forward_kl,
    generalized_jsd,
    masked_reduce,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)


def ref_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P‖Q) in float64 written out term by term, independent of the implementation."""
    p = torch.softmax(p_logits.double() / temperature, -1)
    q = torch.softmax(q_logits.double() / temperature, -1)
    return (p * (p.log() - q.log())).sum(-1)


def ref_jsd(s_logits: torch.Tensor, t_logits: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """β·KL(T‖M) + (1−β)·KL(S‖M), M = βT + (1−β)S, in float64 probability space."""
    s = torch.softmax(s_logits.double() / temperature, -1)
    t = torch.softmax(t_logits.double() / temperature, -1)
    m = beta * t + (1 - beta) * s
    return beta * (t * (t.log() - m.log())).sum(-1) + (1 - beta) * (s * (s.log() - m.log())).sum(-1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_forward_and_reverse_kl_match_reference(logits, temperature):
    s, t = logits
    torch.testing.assert_close(forward_kl(s, t, temperature).double(), ref_kl(t, s, temperature), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reverse_kl(s, t, temperature).double(), ref_kl(s, t, temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_generalized_jsd_matches_reference(logits, beta, temperature):
    s, t = logits
    got = generalized_jsd(s, t, beta=beta, temperature=temperature).double()
    torch.testing.assert_close(got, ref_jsd(s, t, beta, temperature), rtol=1e-5, atol=1e-6)


def test_jsd_endpoints_are_plain_kls(logits):
    s, t = logits
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    # and F.kl_div agrees with the forward KL, as TRL's tests check
    fkl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                     reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(s, t), fkl, rtol=1e-5, atol=1e-6)


def test_zero_on_identical_inputs_and_nonnegative(logits):
    s, t = logits
    for fn in (forward_kl, reverse_kl, lambda a, b: generalized_jsd(a, b, beta=0.5)):
        assert fn(s, s).abs().max() < 1e-6
        assert (fn(s, t) >= -1e-7).all()


def test_jsd_is_bounded_by_log2_at_half(logits):
    s, t = logits
    # JSD(0.5) <= 0.5 * log 2 ... for the unscaled form each KL(·‖M) <= log 2 at beta = 0.5
    assert (generalized_jsd(s * 50, t * 50, beta=0.5) <= math.log(2) + 1e-5).all()


def test_gradients_match_reference(logits):
    s, t = logits
    for beta in (0.0, 0.3, 1.0):
        s1 = s.clone().requires_grad_(True)
        generalized_jsd(s1, t, beta=beta).sum().backward()
        s2 = s.double().clone().requires_grad_(True)
        ref = ref_kl(t, s2) if beta == 0 else ref_kl(s2, t) if beta == 1 else ref_jsd(s2, t, beta)
        ref.sum().backward()
        torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


def test_finite_for_extreme_and_masked_logits():
    s = torch.tensor([[1e4, -1e4, 0.0, float("-inf")]])
    t = torch.tensor([[-1e4, 1e4, 0.0, float("-inf")]])
    for value in (forward_kl(s, t), reverse_kl(s, t), generalized_jsd(s, t, beta=0.5)):
        assert torch.isfinite(value).all()
    # a -inf entry in both contributes nothing: same value as dropping that entry
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.5), generalized_jsd(s[:, :3], t[:, :3], beta=0.5))


def test_bfloat16_inputs_are_computed_in_float32(logits):
    s, t = logits
    got = generalized_jsd(s.bfloat16(), t.bfloat16(), beta=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, generalized_jsd(s.bfloat16().float(), t.bfloat16().float(), beta=0.5))


def test_invalid_beta_raises(logits):
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(*logits, beta=1.5)


def test_masked_reduce_is_invariant_to_splitting_the_batch():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(6, 7, generator=g)
    mask = (torch.rand(6, 7, generator=g) > 0.4).long()
    whole = masked_reduce(values, mask)
    expected = (values * mask).sum() / mask.sum()
    torch.testing.assert_close(whole, expected)
    total = int(mask.sum())
    parts = sum(masked_reduce(values[i : i + 2], mask[i : i + 2], total) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, whole)


# ---- skew KLs, total variation, clipped forward KL, entropy -------------------------------------------------------


def ref_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, -1)


def ref_skew_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, alpha: float, temperature: float = 1.0) -> torch.Tensor:
    """KL(P‖αP + (1−α)Q) in float64 probability space."""
    p, q = ref_probs(p_logits, temperature), ref_probs(q_logits, temperature)
    m = alpha * p + (1 - alpha) * q
    return (p * (p.log() - m.log())).sum(-1)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_skew_kls_match_reference(logits, alpha, temperature):
    s, t = logits
    torch.testing.assert_close(skew_forward_kl(s, t, alpha, temperature).double(), ref_skew_kl(t, s, alpha, temperature),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha, temperature).double(), ref_skew_kl(s, t, alpha, temperature),
                               rtol=1e-5, atol=1e-6)


def test_skew_kl_endpoints(logits):
    s, t = logits
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    for fn in (skew_forward_kl, skew_reverse_kl):
        assert torch.equal(fn(s, t, alpha=1.0), torch.zeros(s.shape[:-1]))
        with pytest.raises(ValueError, match="alpha"):
            fn(s, t, alpha=-0.1)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.6])
def test_skew_kl_gradients_match_reference(logits, alpha):
    s, t = logits
    for fn, ref in ((skew_forward_kl, lambda a: ref_skew_kl(t, a, alpha, 0.7)),
                    (skew_reverse_kl, lambda a: ref_skew_kl(a, t, alpha, 0.7))):
        s1 = s.clone().requires_grad_(True)
        fn(s1, t, alpha, 0.7).sum().backward()
        s2 = s.double().clone().requires_grad_(True)
        ref(s2).sum().backward()
        torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_total_variation_matches_reference(logits, temperature):
    s, t = logits
    ref = 0.5 * (ref_probs(t, temperature) - ref_probs(s, temperature)).abs().sum(-1)
    got = total_variation(s, t, temperature)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert ((got >= 0) & (got <= 1 + 1e-6)).all()
    assert total_variation(s, s).abs().max() < 1e-6


@pytest.mark.parametrize("clip", [0.01, 0.05, 0.3])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_clipped_forward_kl_matches_reference(logits, clip, temperature):
    s, t = logits
    p, q = ref_probs(t, temperature), ref_probs(s, temperature)
    ref = (p * (p.log() - q.log())).clamp(max=clip).sum(-1)  # each vocabulary entry clipped, then summed
    torch.testing.assert_close(clipped_forward_kl(s, t, clip, temperature).double(), ref, rtol=1e-5, atol=1e-6)


def test_clipped_forward_kl_large_clip_is_forward_kl_and_capped_entries_pass_no_gradient(logits):
    s, t = logits
    torch.testing.assert_close(clipped_forward_kl(s, t, clip=1e6), forward_kl(s, t))
    s1 = s.clone().requires_grad_(True)
    clipped_forward_kl(s1, t, clip=1e6).sum().backward()
    s2 = s.double().clone().requires_grad_(True)
    ref_kl(t, s2).sum().backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="clip"):
        clipped_forward_kl(s, t, clip=0.0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_entropy_matches_reference(logits, temperature):
    s, _ = logits
    p = ref_probs(s, temperature)
    torch.testing.assert_close(entropy(s, temperature).double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy(torch.zeros(4, 11)), torch.full((4,), math.log(11)))


def _all_divergences():
    return {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": lambda a, b: generalized_jsd(a, b, beta=0.5),
            "skew_forward_kl": skew_forward_kl, "skew_reverse_kl": skew_reverse_kl, "total_variation": total_variation,
            "clipped_forward_kl": clipped_forward_kl, "entropy": lambda a, b: entropy(a)}


@pytest.mark.parametrize("name", list(_all_divergences()))
def test_masked_vocabulary_entries_give_finite_values(name):
    fn = _all_divergences()[name]
    s = torch.tensor([[1e4, -1e4, 0.0, float("-inf")], [2.0, 1.0, float("-inf"), 0.5]])
    t = torch.tensor([[-1e4, 1e4, 0.0, float("-inf")], [0.0, 3.0, float("-inf"), 1.0]])
    assert torch.isfinite(fn(s, t)).all()
    # an entry that is -inf in both models contributes nothing: same as dropping it
    keep = [0, 1, 3]
    torch.testing.assert_close(fn(s[1:], t[1:]), fn(s[1:, keep], t[1:, keep]))


@pytest.mark.parametrize("name", list(_all_divergences()))
def test_masked_vocabulary_entries_give_finite_gradients(name):
    s = torch.tensor([[2.0, 1.0, float("-inf"), 0.5]], requires_grad=True)
    t = torch.tensor([[0.0, 3.0, float("-inf"), 1.0]])
    _all_divergences()[name](s, t).sum().backward()
    assert torch.isfinite(s.grad).all()
