"""Thinking Machines OPD: the sampled reverse-KL advantage, its REINFORCE gradient, the discounted option."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.methods.tm_opd import TMOPD
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2", "sampler.max_new_tokens=12")
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def student_batch(seed: int = 0, vocab: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, MASK.shape, generator=g)
    batch = RolloutBatch(torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), ids, MASK.clone(), [],
                         "student")
    return batch, 2 * torch.randn(*MASK.shape, vocab, generator=g), 2 * torch.randn(*MASK.shape, vocab, generator=g)


def sampled_rkl(batch, s, t):
    ids = batch.completion_ids[..., None]
    return (torch.log_softmax(s.double(), -1).gather(-1, ids) - torch.log_softmax(t.double(), -1).gather(-1, ids)).squeeze(-1)


@pytest.mark.parametrize("kl_coef", [1.0, 0.5])
def test_loss_is_the_scaled_sampled_reverse_kl_and_gradient_is_reinforce(kl_coef):
    batch, s, t = student_batch()
    s = s.clone().requires_grad_(True)
    out = TMOPD(kl_coef=kl_coef).loss(batch, s, t, num_tokens=10)
    rkl = sampled_rkl(batch, s.detach(), t)
    m = MASK.bool()
    assert out.loss.item() == pytest.approx(kl_coef * rkl[m].sum().item() / 10, rel=1e-5)
    assert out.metrics["tm_opd/reverse_kl"] == pytest.approx(rkl[m].sum().item() / 10, rel=1e-5)
    out.loss.backward()
    # −A·∇_z log softmax(z)[y] = −A·(onehot(y) − q), A = −c·rkl, per real token, / num_tokens
    adv = -kl_coef * rkl
    q = torch.softmax(s.detach().double(), -1)
    onehot = torch.nn.functional.one_hot(batch.completion_ids, q.shape[-1]).double()
    expected = (-adv[..., None] * (onehot - q)) * m[..., None] / 10
    assert torch.allclose(s.grad.double(), expected, atol=1e-6)


def test_sampler_logprobs_are_the_old_policy_when_recorded():
    batch, s, t = student_batch(seed=1)
    batch.sampler_logprobs = torch.log_softmax(s, -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1) - 0.2
    out = TMOPD().loss(batch, s, t, num_tokens=7)
    # ratio = exp(0.2) at every real token, advantage from the sampler's log-probs
    teacher_lp = torch.log_softmax(t.double(), -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    rkl = batch.sampler_logprobs.double() - teacher_lp
    assert out.loss.item() == pytest.approx(math.exp(0.2) * rkl[MASK.bool()].sum().item() / 7, rel=1e-5)


def test_discounted_advantage_matches_a_hand_loop():
    batch, s, t = student_batch(seed=2)
    gamma = 0.5
    out = TMOPD(kl_discount_factor=gamma).loss(batch, s, t, num_tokens=7)
    adv = -sampled_rkl(batch, s, t)
    total = 0.0
    for i in range(3):
        real = [k for k in range(4) if MASK[i, k]]
        for k in real:
            total += -sum(gamma ** (u - k) * adv[i, u].item() for u in real if u >= k)
    assert out.loss.item() == pytest.approx(total / 7, rel=1e-5)


def test_invalid_values_fail_at_build():
    with pytest.raises(ConfigError, match="kl_coef must be > 0"):
        METHODS.build({"name": "tm_opd", "kl_coef": 0.0})
    with pytest.raises(ConfigError, match=r"kl_discount_factor must be in \[0, 1\]"):
        METHODS.build({"name": "tm_opd", "kl_discount_factor": 1.5})


def test_training_steps(compose_cfg):
    trainer = build_trainer(compose_cfg("method=tm_opd", *FAST))
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["tm_opd/reverse_kl"])
        assert metrics["train/loss"] == pytest.approx(metrics["tm_opd/reverse_kl"], rel=1e-4, abs=1e-6)
