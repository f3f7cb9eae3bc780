"""AOPD: tokens the teacher disfavours go to the top-K forward KL, the others to the policy gradient."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.losses.divergences import generalized_jsd
from opd.losses.topk import topk_forward_kl
from opd.methods.aopd import AOPD
from opd.methods.tm_opd import TMOPD
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2", "sampler.max_new_tokens=12")
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
V = 7


def student_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, MASK.shape, generator=g)
    batch = RolloutBatch(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), ids, MASK.clone(), [],
                         "student")
    return batch, 2 * torch.randn(*MASK.shape, V, generator=g), 2 * torch.randn(*MASK.shape, V, generator=g)


def hand_loss(batch, s, t, k, num_tokens):
    """Float64, one position at a time: A ≤ 0 → raw teacher-top-k FKL, A > 0 → −A (ratio 1)."""
    log_q, log_p = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    total, gated = 0.0, 0
    for i in range(MASK.shape[0]):
        for j in range(MASK.shape[1]):
            if not MASK[i, j]:
                continue
            y = batch.completion_ids[i, j]
            adv = (log_p[i, j, y] - log_q[i, j, y]).item()
            if adv <= 0:
                gated += 1
                top = sorted(range(V), key=lambda v: -log_p[i, j, v].item())[:k]
                total += sum(log_p[i, j, v].exp().item() * (log_p[i, j, v] - log_q[i, j, v]).item() for v in top)
            else:
                total += -adv
    return total / num_tokens, gated


@pytest.mark.parametrize("k", [1, 3, V])
def test_routing_and_loss_match_a_per_token_hand_computation(k):
    batch, s, t = student_batch()
    out = AOPD(k=k).loss(batch, s, t, num_tokens=10)
    expected, gated = hand_loss(batch, s, t, k, 10)
    assert 0 < gated < 10  # both routes exercised
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["aopd/fkl_fraction"] == pytest.approx(gated / 10)
    assert out.metrics["aopd/pg_loss"] + out.metrics["aopd/fkl_loss"] == pytest.approx(out.loss.item(), rel=1e-6)


def test_gradients_follow_the_route():
    batch, s, t = student_batch(seed=1)
    logits = s.clone().requires_grad_(True)
    AOPD(k=3).loss(batch, logits, t, num_tokens=10).loss.backward()
    ids = batch.completion_ids[..., None]
    adv = (torch.log_softmax(t, -1).gather(-1, ids) - torch.log_softmax(s, -1).gather(-1, ids)).squeeze(-1)
    gated = (adv <= 0) & MASK.bool()
    # gated tokens: the gradient of the top-k forward KL; the others: −A·∇log q(y) = −A·(onehot − q)
    fkl_logits = s.clone().requires_grad_(True)
    topk_forward_kl(fkl_logits, t, 3, "raw").mul(gated).sum().div(10).backward()
    q = torch.softmax(s, -1)
    pg_grad = -adv[..., None] * (torch.nn.functional.one_hot(batch.completion_ids, V) - q) / 10
    expected = torch.where(gated[..., None], fkl_logits.grad, torch.where(MASK.bool()[..., None], pg_grad, 0.0))
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_prob_diff_gate_endpoints():
    batch, s, t = student_batch(seed=2)
    opd = AOPD(gate_on="prob_diff", tau=-1.0, k=V).loss(batch, s, t, num_tokens=10)  # never gated: plain OPD
    assert opd.metrics["aopd/fkl_fraction"] == 0
    assert opd.loss.item() == pytest.approx(TMOPD().loss(batch, s, t, num_tokens=10).loss.item(), rel=1e-6)
    fkl = AOPD(gate_on="prob_diff", tau=1.0, k=V).loss(batch, s, t, num_tokens=10)  # always gated: full forward KL
    assert fkl.metrics["aopd/fkl_fraction"] == pytest.approx(1.0)
    log_q, log_p = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    full = (log_p.exp() * (log_p - log_q)).sum(-1)[MASK.bool()].sum().item() / 10
    assert fkl.loss.item() == pytest.approx(full, rel=1e-5)
    same = AOPD(gate_on="prob_diff", k=3).loss(batch, s, t, 10)  # τ = 0: the same tokens as the log-ratio gate
    assert same.loss.item() == pytest.approx(AOPD(k=3).loss(batch, s, t, 10).loss.item(), rel=1e-6)


def test_jsd_option_is_the_renormalised_top_k_jsd():
    batch, s, t = student_batch(seed=3)
    out = AOPD(divergence="jsd", gate_on="prob_diff", tau=1.0, k=4, jsd_beta=0.3).loss(batch, s, t, num_tokens=10)
    ids = t.topk(4, -1).indices
    jsd = generalized_jsd(s.gather(-1, ids), t.gather(-1, ids), beta=0.3)
    assert out.loss.item() == pytest.approx(jsd[MASK.bool()].sum().item() / 10, rel=1e-5)


def test_k_larger_than_the_vocabulary_is_a_clear_error():
    batch, s, t = student_batch()
    with pytest.raises(ValueError, match=r"method.k = 8 exceeds the vocabulary size V = 7"):
        AOPD(k=8).loss(batch, s, t, num_tokens=10)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"k": 0}, "k must be >= 1"), ({"gate_on": "prob_diff", "tau": 1.5}, r"tau must be in \[-1, 1\]"),
    ({"divergence": "rkl"}, "divergence must be one of"), ({"jsd_beta": 1.0}, r"jsd_beta must be in \(0, 1\)"),
])
def test_invalid_values_fail_at_build(overrides, message):
    with pytest.raises(ConfigError, match=message):
        METHODS.build({"name": "aopd", **overrides})


def test_training_steps(compose_cfg):
    trainer = build_trainer(compose_cfg("method=aopd", *FAST))
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and 0 <= metrics["aopd/fkl_fraction"] <= 1
        assert {"aopd/pg_loss", "aopd/fkl_loss"} <= set(metrics)
