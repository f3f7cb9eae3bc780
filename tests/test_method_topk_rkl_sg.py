"""Stop-gradient top-K reverse KL: the raw value, the gradient without the +1 term, renorm, and the K check."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from opd.errors import ConfigError
from opd.losses.divergences import reverse_kl
from opd.methods.topk_rkl_sg import TopKRKLStopGrad
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2", "sampler.max_new_tokens=12")
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
V = 6


def student_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, MASK.shape, generator=g)
    batch = RolloutBatch(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), ids, MASK.clone(), [],
                         "student")
    return batch, 2 * torch.randn(*MASK.shape, V, generator=g), 2 * torch.randn(*MASK.shape, V, generator=g)


def support(logits, k):
    """[..., V] bool: the top-k entries, by a Python sort."""
    out = torch.zeros(logits.shape, dtype=torch.bool)
    for i, j in itertools.product(range(logits.shape[0]), range(logits.shape[1])):
        for v in sorted(range(V), key=lambda v: -logits[i, j, v].item())[:k]:
            out[i, j, v] = True
    return out


@pytest.mark.parametrize(("k", "on"), [(2, "student"), (4, "teacher")])
def test_stopgrad_value_and_gradient_match_the_analytic_forms(k, on):
    batch, s, t = student_batch()
    logits = s.clone().requires_grad_(True)
    out = TopKRKLStopGrad(k=k, support=on).loss(batch, logits, t, num_tokens=5)
    q, log_q, log_p = torch.softmax(s.double(), -1), torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    in_s = support(s if on == "student" else t, k)
    c = torch.where(in_s, log_q - log_p, 0.0)
    value = (q * c).sum(-1)  # the raw truncated reverse KL
    m = MASK.bool()
    assert out.loss.item() == pytest.approx(value[m].sum().item() / 5, rel=1e-5)
    out.loss.backward()
    # ∂/∂z_j Σ_{v∈S} q_v·c_v with c held fixed = q_j·(c_j − Σ_{v∈S} q_v c_v): no "+1" term
    expected = q * (c - value[..., None]) * m[..., None] / 5
    assert torch.allclose(logits.grad.double(), expected, atol=1e-6)


def test_full_support_stopgrad_gradient_equals_full_reverse_kl_gradient():
    batch, s, t = student_batch(seed=1)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    TopKRKLStopGrad(k=V).loss(batch, a, t, num_tokens=4).loss.backward()
    (reverse_kl(b, t) * MASK).sum().div(4).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_renorm_mode_is_kl_of_the_renormalised_support():
    batch, s, t = student_batch(seed=2)
    out = TopKRKLStopGrad(k=3, mode="renorm").loss(batch, s, t, num_tokens=4)
    in_s = support(s, 3)
    qs = torch.softmax(s.double().masked_fill(~in_s, -math.inf), -1)
    ps = torch.softmax(t.double().masked_fill(~in_s, -math.inf), -1)
    kl = torch.where(in_s, qs * (qs.log() - ps.log()), 0.0).sum(-1)
    assert out.loss.item() == pytest.approx(kl[MASK.bool()].sum().item() / 4, rel=1e-5)
    mass = torch.where(in_s, torch.softmax(s.double(), -1), 0.0).sum(-1)[MASK.bool()].sum().item() / 4
    assert out.metrics["topk_rkl_sg/support_mass"] == pytest.approx(mass, rel=1e-5)


def test_k_larger_than_the_vocabulary_names_method_k():
    batch, s, t = student_batch()
    with pytest.raises(ValueError, match=r"method.k = 20 exceeds the vocabulary size V = 6"):
        TopKRKLStopGrad().loss(batch, s, t, num_tokens=4)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("k", -1, "k must be >= 1"), ("mode", "exact", "mode must be one of"), ("support", "both", "support must be one of"),
])
def test_invalid_values_fail_at_build(key, value, message):
    with pytest.raises(ConfigError, match=message):
        METHODS.build({"name": "topk_rkl_sg", key: value})


def test_training_steps_with_the_default_k_on_the_toy_vocabulary(compose_cfg):
    trainer = build_trainer(compose_cfg("method=topk_rkl_sg", *FAST))
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and 0 < metrics["topk_rkl_sg/support_mass"] <= 1 + 1e-6


def test_top_k_larger_than_the_vocabulary_fails_at_start_up(compose_cfg):
    from opd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method.k = 40 exceeds the vocabulary size V = 26"):
        build_trainer(compose_cfg("method=topk_rkl_sg", "method.k=40"))
