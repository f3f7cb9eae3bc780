"""REOPOLD: the reward floor log(λ/(1−λ)), the entropy mask and their normalisation, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.methods.reopold import REOPOLD
from opd.methods.tm_opd import TMOPD
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2", "sampler.max_new_tokens=12")
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def student_batch(seed: int = 0, vocab: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, MASK.shape, generator=g)
    batch = RolloutBatch(torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), ids, MASK.clone(), [],
                         "student")
    return batch, 3 * torch.randn(*MASK.shape, vocab, generator=g), 3 * torch.randn(*MASK.shape, vocab, generator=g)


def rewards_and_entropy(batch, s, t):
    ids = batch.completion_ids[..., None]
    log_q, log_p = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    return (log_p.gather(-1, ids) - log_q.gather(-1, ids)).squeeze(-1), -(log_q.exp() * log_q).sum(-1)


@pytest.mark.parametrize("lmbda", [0.1, 0.17, 0.4])
def test_reward_floor_without_mask(lmbda):
    batch, s, t = student_batch()
    out = REOPOLD(lmbda=lmbda, keep_fraction=1.0).loss(batch, s, t, num_tokens=10)
    reward, _ = rewards_and_entropy(batch, s, t)
    floor = math.log(lmbda / (1 - lmbda))
    m = MASK.bool()
    floored = [max(r, floor) for r in reward[m].tolist()]
    assert out.loss.item() == pytest.approx(-sum(floored) / 10, rel=1e-5)  # ratio 1: loss −R̂
    assert out.metrics["reopold/clipped_fraction"] == pytest.approx(sum(r < floor for r in reward[m].tolist()) / 10)
    assert out.metrics["reopold/kept_fraction"] == pytest.approx(10 / 10)
    assert 0 < out.metrics["reopold/clipped_fraction"] < 1  # the data exercise both sides of the floor


def test_lambda_zero_and_no_mask_is_plain_sampled_token_opd():
    batch, s, t = student_batch(seed=1)
    reopold = REOPOLD(lmbda=0.0, keep_fraction=1.0, clip_eps=None).loss(batch, s, t, num_tokens=10)
    assert reopold.loss.item() == pytest.approx(TMOPD().loss(batch, s, t, num_tokens=10).loss.item(), rel=1e-6)
    assert reopold.metrics["reopold/clipped_fraction"] == 0


@pytest.mark.parametrize(("scope", "normalize"), [("batch", "kept"), ("sequence", "all")])
def test_entropy_mask_keeps_the_highest_entropy_tokens(scope, normalize):
    batch, s, t = student_batch(seed=2)
    keep_fraction, lmbda = 0.4, 0.2
    reward, ent = rewards_and_entropy(batch, s, t)
    floor = math.log(lmbda / (1 - lmbda))
    keep = torch.zeros(MASK.shape, dtype=torch.bool)
    groups = [[(i, k) for i in range(3) for k in range(5) if MASK[i, k]]] if scope == "batch" else \
        [[(i, k) for k in range(5) if MASK[i, k]] for i in range(3)]
    for group in groups:
        n = max(1, math.floor(keep_fraction * len(group)))
        for i, k in sorted(group, key=lambda p: -ent[p].item())[:n]:
            keep[i, k] = True
    s_grad = s.clone().requires_grad_(True)
    out = REOPOLD(lmbda=lmbda, keep_fraction=keep_fraction, mask_scope=scope, normalize=normalize).loss(
        batch, s_grad, t, num_tokens=10)
    denom = 10 * keep_fraction if normalize == "kept" else 10
    assert out.loss.item() == pytest.approx(-reward.clamp(min=floor)[keep].sum().item() / denom, rel=1e-5)
    assert out.metrics["reopold/kept_fraction"] == pytest.approx(keep.sum().item() / 10)
    out.loss.backward()
    assert torch.equal(s_grad.grad.abs().sum(-1) > 0, keep)


def test_teacher_entropy_option_ranks_by_the_teacher():
    batch, s, t = student_batch(seed=3)
    ent_t = -(torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1).masked_fill(~MASK.bool(), -1)
    top = ent_t.flatten().argmax()
    logits = s.clone().requires_grad_(True)
    REOPOLD(keep_fraction=0.1, entropy_source="teacher").loss(batch, logits, t, num_tokens=10).loss.backward()
    has_grad = (logits.grad.abs().sum(-1) > 0).flatten()
    assert has_grad.sum() == 1 and has_grad[top]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lmbda", 1.0, r"lmbda must be in \[0, 1\)"), ("lmbda", -0.1, r"lmbda must be in \[0, 1\)"),
    ("keep_fraction", 0.0, r"keep_fraction must be in \(0, 1\]"), ("clip_eps", 0.0, "clip_eps must be > 0"),
    ("entropy_source", "both", "entropy_source must be one of"),
])
def test_invalid_values_fail_at_build(key, value, message):
    with pytest.raises(ConfigError, match=message):
        METHODS.build({"name": "reopold", key: value})


def test_training_steps(compose_cfg):
    trainer = build_trainer(compose_cfg("method=reopold", *FAST))
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"])
        assert {"reopold/clipped_fraction", "reopold/kept_fraction", "reopold/reward_mean"} <= set(metrics)
        assert 0 < metrics["reopold/kept_fraction"] <= 1
