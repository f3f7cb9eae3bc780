"""EOPD: clipped sampled-token OPD everywhere, plus the teacher top-K forward KL where teacher entropy exceeds τ."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.methods.eopd import EOPD
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2", "sampler.max_new_tokens=12")
V = 8
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
# teacher entropy per position: True = nearly uniform over V (entropy ≈ log 8 ≈ 2.08; distinct logits, so the
# top-K set has no ties), False = near one-hot (≈ 0)
UNIFORM = torch.tensor([[True, False, True, False], [False, True, False, True]])


def gated_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, MASK.shape, generator=g)
    batch = RolloutBatch(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), ids, MASK.clone(), [],
                         "student")
    peaked = torch.full((V,), -20.0)
    peaked[3] = 20.0
    t = torch.where(UNIFORM[..., None], 0.05 * torch.arange(V, dtype=torch.float), peaked)
    return batch, 2 * torch.randn(*MASK.shape, V, generator=g), t


def reference(batch, s, t, tau, alpha, k, num_tokens):
    """Float64: −A (ratio 1) + α·1[H > τ]·Σ_{top-k of p_T} p_T (log p_T − log q), / num_tokens; gated count; entropy."""
    ids = batch.completion_ids[..., None]
    log_q, log_p = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    adv = (log_p.gather(-1, ids) - log_q.gather(-1, ids)).squeeze(-1)
    ent = -(log_p.exp() * log_p).sum(-1)
    top = log_p.topk(k, -1).indices
    lp, lq = log_p.gather(-1, top), log_q.gather(-1, top)
    fkl = (lp.exp() * (lp - lq)).sum(-1)
    m = MASK.bool()
    gate = (ent > tau) & m
    return ((-adv)[m].sum() + alpha * fkl[gate].sum()).item() / num_tokens, gate.sum().item(), ent[m].sum().item() / num_tokens


@pytest.mark.parametrize(("tau", "alpha", "k"), [(1.0, 1.0, 4), (1.0, 0.5, 8), (3.0, 1.0, 4)])
def test_loss_and_gated_fraction_against_hand_set_entropies(tau, alpha, k):
    batch, s, t = gated_batch()
    out = EOPD(tau=tau, alpha=alpha, k=k).loss(batch, s, t, num_tokens=10)
    expected, gated, mean_entropy = reference(batch, s, t, tau, alpha, k, 10)
    assert gated == ((UNIFORM & MASK.bool()).sum().item() if tau < math.log(V) else 0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["eopd/gated_fraction"] == pytest.approx(gated / 10)
    assert out.metrics["eopd/teacher_entropy"] == pytest.approx(mean_entropy, rel=1e-4)


def test_forward_kl_gradient_reaches_only_gated_tokens():
    batch, s, t = gated_batch(seed=1)
    grads = []
    for alpha in (0.0, 1.0):
        logits = s.clone().requires_grad_(True)
        EOPD(tau=1.0, alpha=alpha, k=4).loss(batch, logits, t, num_tokens=7).loss.backward()
        grads.append(logits.grad)
    changed = (grads[0] - grads[1]).abs().sum(-1) > 1e-7
    assert torch.equal(changed, UNIFORM & MASK.bool())


def test_k_larger_than_the_vocabulary_is_a_clear_error():
    batch, s, t = gated_batch()
    with pytest.raises(ValueError, match=r"method.k = 9 exceeds the vocabulary size V = 8"):
        EOPD(k=9).loss(batch, s, t, num_tokens=7)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("k", 0, "k must be >= 1"), ("tau", -1.0, "tau must be >= 0"), ("alpha", -0.5, "alpha must be >= 0"),
    ("clip_eps", -0.2, "clip_eps must be > 0"), ("fkl_mode", "stopgrad", "fkl_mode must be one of"),
])
def test_invalid_values_fail_at_build(key, value, message):
    with pytest.raises(ConfigError, match=message):
        METHODS.build({"name": "eopd", key: value})


def test_training_steps(compose_cfg):
    trainer = build_trainer(compose_cfg("method=eopd", *FAST))
    for _ in range(2):
        metrics = trainer.train_step()
        keys = {"eopd/gated_fraction", "eopd/teacher_entropy", "eopd/opd_loss", "eopd/fkl_loss"}
        assert math.isfinite(metrics["train/loss"]) and keys <= set(metrics)
        assert 0 <= metrics["eopd/gated_fraction"] <= 1
