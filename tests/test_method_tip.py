"""TIP: per-sequence Soft-OR token selection and reverse KL on the kept tokens, against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.methods.tip import TIP
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2", "sampler.max_new_tokens=12")
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])


def student_batch(seed: int = 0, vocab: int = 6):
    g = torch.Generator().manual_seed(seed)
    b, t = MASK.shape
    ids = torch.randint(0, vocab, (b, t), generator=g)
    batch = RolloutBatch(torch.ones(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.long), ids, MASK.clone(), [],
                         "student")
    return batch, 2 * torch.randn(b, t, vocab, generator=g), 2 * torch.randn(b, t, vocab, generator=g)


def minmax(values: dict) -> dict:
    lo, hi = min(values.values()), max(values.values())
    return {k: (x - lo) / (hi - lo) if hi > lo else 0.0 for k, x in values.items()}


def hand_selection(s, t, rho):
    """Python lists: entropy and reverse KL per real position, min-max per row, Soft-OR, top floor(ρ·m) (>= 1)."""
    log_q, log_p = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    ent = -(log_q.exp() * log_q).sum(-1)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    keep = torch.zeros(MASK.shape, dtype=torch.bool)
    for i in range(MASK.shape[0]):
        real = [k for k in range(MASK.shape[1]) if MASK[i, k]]
        if not real:
            continue
        h, d = minmax({k: ent[i, k].item() for k in real}), minmax({k: rkl[i, k].item() for k in real})
        score = {k: 1 - (1 - h[k]) * (1 - d[k]) for k in real}  # Soft-OR ĥ + δ̂ − ĥδ̂; exactly 1 where ĥ or δ̂ is 1: ties
        n = max(1, math.floor(rho * len(real)))
        for k in sorted(real, key=lambda k: -score[k])[:n]:  # stable: ties keep the earlier position
            keep[i, k] = True
    return keep, rkl


@pytest.mark.parametrize("rho", [0.25, 0.5, 1.0])
def test_selected_tokens_and_loss_match_a_hand_computation(rho):
    batch, s, t = student_batch()
    method = TIP(rho=rho)
    keep, rkl = hand_selection(s, t, rho)
    out = method.loss(batch, s, t, num_tokens=12)
    assert torch.equal(method.select(s, rkl.float(), MASK), keep)
    assert out.loss.item() == pytest.approx(rkl[keep].sum().item() / (12 * rho), rel=1e-5)
    assert out.metrics["tip/kept_fraction"] == pytest.approx(keep.sum().item() / 12)
    every = TIP(rho=rho, normalize="all").loss(batch, s, t, num_tokens=12)
    assert every.loss.item() == pytest.approx(rkl[keep].sum().item() / 12, rel=1e-5)


def test_rho_one_is_plain_reverse_kl_and_dropped_tokens_get_no_gradient():
    batch, s, t = student_batch(seed=1)
    full = TIP(rho=1.0).loss(batch, s, t, num_tokens=12)
    assert full.loss.item() == pytest.approx(full.metrics["tip/reverse_kl"], rel=1e-6)
    logits = s.clone().requires_grad_(True)
    method = TIP(rho=0.5)
    method.loss(batch, logits, t, num_tokens=12).loss.backward()
    keep, _ = hand_selection(s, t, 0.5)
    has_grad = logits.grad.abs().sum(-1) > 0
    assert torch.equal(has_grad, keep)


def test_invalid_values_fail_at_build():
    with pytest.raises(ConfigError, match=r"rho must be in \(0, 1\]"):
        METHODS.build({"name": "tip", "rho": 0.0})
    with pytest.raises(ConfigError, match="normalize must be one of"):
        METHODS.build({"name": "tip", "normalize": "sequence"})


def test_training_steps(compose_cfg):
    trainer = build_trainer(compose_cfg("method=tip", *FAST))
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and 0 < metrics["tip/kept_fraction"] <= 1
