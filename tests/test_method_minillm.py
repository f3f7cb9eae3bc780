"""MiniLLM: returns, whitening, importance weights and the PPO + single-step loss against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.methods.minillm import MiniLLM
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2", "sampler.max_new_tokens=12")
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])


def mixed_batch(seed: int = 0, vocab: int = 7):
    """(batch, student_logits, teacher_logits): ragged mask (one empty row), sampler and mixture log-probs."""
    g = torch.Generator().manual_seed(seed)
    b, t = MASK.shape
    ids = torch.randint(0, vocab, (b, t), generator=g)
    batch = RolloutBatch(torch.ones(b, 2, dtype=torch.long), torch.ones(b, 2, dtype=torch.long), ids, MASK.clone(), [],
                         "mixed")
    s, te = 2 * torch.randn(b, t, vocab, generator=g), 2 * torch.randn(b, t, vocab, generator=g)
    noise = 0.1 * torch.randn(b, t, generator=g)
    batch.sampler_logprobs = torch.log_softmax(s, -1).gather(-1, ids[..., None]).squeeze(-1) + noise
    batch.extras["mix_logprobs"] = batch.sampler_logprobs + 0.3 * torch.randn(b, t, generator=g)
    return batch, s, te


def hand_advantages(rewards, mask, gamma, include_current, whiten=True):
    """Plain Python loops over real tokens: discounted, length-normalised returns, then masked whitening."""
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        real = [t for t in range(rewards.shape[1]) if mask[i, t]]
        for t in real:
            later = [u for u in real if (u >= t if include_current else u > t)]
            start = t if include_current else t + 1
            total = sum(gamma ** (u - start) * rewards[i, u].item() for u in later)
            out[i, t] = total / len(later) if later else 0.0
    if whiten:
        vals = out[mask.bool()]
        mean, var = vals.mean(), vals.var(unbiased=False)
        out = torch.where(mask.bool(), (out - mean) / torch.sqrt(var + 1e-8), 0.0)
    return out


@pytest.mark.parametrize(("gamma", "include_current"), [(1.0, False), (0.95, True), (0.9, False)])
def test_advantages_match_a_hand_loop_with_ragged_masks(gamma, include_current):
    rewards = torch.randn(MASK.shape, generator=torch.Generator().manual_seed(3)) * 3
    rewards = torch.where(MASK.bool(), rewards, torch.tensor(1e6))  # padding rewards must not leak
    method = MiniLLM(gamma=gamma, include_current_reward=include_current)
    adv = method.advantages(rewards, MASK)
    assert torch.allclose(adv.double(), hand_advantages(rewards, MASK, gamma, include_current), atol=1e-5)
    assert (adv[~MASK.bool()] == 0).all()


def reference_loss(batch, s, t, num_tokens, clip=0.2, reg_weighted=True, gamma=1.0, include_current=False):
    """Float64: PPO-clipped importance-weighted PG on whitened returns + (w·) exact reverse KL, / num_tokens."""
    m = batch.completion_mask.bool()
    ids = batch.completion_ids[..., None]
    log_q = torch.log_softmax(s.double(), -1)
    log_p = torch.log_softmax(t.double(), -1)
    old = batch.sampler_logprobs.double()
    rewards = log_p.gather(-1, ids).squeeze(-1) - old
    adv = hand_advantages(rewards, batch.completion_mask, gamma, include_current)
    w = torch.exp(old - batch.extras["mix_logprobs"].double())
    ratio = torch.exp(log_q.gather(-1, ids).squeeze(-1) - old) * w
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1) * (w if reg_weighted else 1.0)
    return pg[m].sum().item() / num_tokens, rkl[m].sum().item() / num_tokens, rewards[m].sum().item() / num_tokens


@pytest.mark.parametrize(("reg_weighted", "gamma", "include_current"), [(True, 1.0, False), (False, 0.95, True)])
def test_loss_matches_float64_reference(reg_weighted, gamma, include_current):
    batch, s, t = mixed_batch()
    out = MiniLLM(reg_importance_weighted=reg_weighted, gamma=gamma, include_current_reward=include_current).loss(
        batch, s, t, num_tokens=12)
    pg, reg, reward = reference_loss(batch, s, t, 12, reg_weighted=reg_weighted, gamma=gamma, include_current=include_current)
    assert out.loss.item() == pytest.approx(pg + reg, rel=1e-4, abs=1e-6)
    assert out.metrics["minillm/pg_loss"] == pytest.approx(pg, rel=1e-4, abs=1e-6)
    assert out.metrics["minillm/reg_loss"] == pytest.approx(reg, rel=1e-4)
    assert out.metrics["minillm/reward_mean"] == pytest.approx(reward, rel=1e-4)
    w = torch.exp(batch.sampler_logprobs - batch.extras["mix_logprobs"])[MASK.bool()]
    assert out.metrics["minillm/is_weight_mean"] == pytest.approx(w.sum().item() / 12, rel=1e-5)
    no_reg = MiniLLM(single_step_reg=False, gamma=gamma, include_current_reward=include_current).loss(batch, s, t, 12)
    assert no_reg.loss.item() == pytest.approx(pg, rel=1e-4, abs=1e-6)


def test_padding_with_extreme_sampler_values_gives_finite_loss_and_gradients():
    batch, s, t = mixed_batch(seed=1)
    pad = ~MASK.bool()
    batch.sampler_logprobs = batch.sampler_logprobs.masked_fill(pad, -1e4)   # e.g. a pad token the sampler never chose
    batch.extras["mix_logprobs"] = batch.extras["mix_logprobs"].masked_fill(pad, float("-inf"))
    s = s.clone().requires_grad_(True)
    out = MiniLLM(alpha=1.0, gamma=0.95).loss(batch, s, t, num_tokens=9)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and torch.isfinite(s.grad).all()
    assert (s.grad[pad] == 0).all()  # padding positions get no gradient


def test_without_sampler_records_it_falls_back_to_current_logits():
    batch, s, t = mixed_batch(seed=2)
    batch.sampler_logprobs, batch.extras = None, {}
    assert (MiniLLM.importance_weights(batch) == 1).all()
    out = MiniLLM().loss(batch, s, t, num_tokens=9)
    assert out.metrics["minillm/is_weight_mean"] == pytest.approx(9 / 9)
    assert math.isfinite(out.loss.item())


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lm_coef", -1.0, "lm_coef must be >= 0"),
    ("lm_kd_ratio", 1.5, "lm_kd_ratio"),
    ("alpha", 1.5, r"alpha must be in \[0, 1\]"),
    ("gamma", -0.1, r"gamma must be in \[0, 1\]"),
    ("clip_eps", 0.0, "clip_eps must be > 0 or null"),
    ("reward_scaling", 0.0, "reward_scaling must be > 0"),
])
def test_invalid_values_fail_at_build(key, value, message):
    with pytest.raises(ConfigError, match=message):
        METHODS.build({"name": "minillm", key: value})


def test_training_steps_on_teacher_mixed_rollouts(compose_cfg):
    trainer = build_trainer(compose_cfg("method=minillm", "method.gamma=0.95", *FAST))
    batch = trainer.collect(next(trainer.prompts))
    assert batch.source == "mixed" and "mix_logprobs" in batch.extras
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"])
        keys = {"minillm/reward_mean", "minillm/pg_loss", "minillm/reg_loss", "minillm/is_weight_mean"}
        assert keys <= set(metrics) and all(math.isfinite(metrics[k]) for k in keys)
        assert metrics["train/loss"] == pytest.approx(metrics["minillm/pg_loss"] + metrics["minillm/reg_loss"], rel=1e-5)


def test_lm_term_equals_a_hand_computed_mix_of_ce_and_forward_kl(compose_cfg):
    """L_PT = lm_coef·((1−r)·CE + r·FKL) on the reference completions, added to the loss and logged."""
    from opd.models.scoring import completion_logits
    from opd.sampling.tokenize import encode_targets

    trainer = build_trainer(compose_cfg("method=minillm", "method.lm_coef=2.0", "method.lm_kd_ratio=0.25",
                                        "trainer.batch_size=3"))
    batch = trainer.collect(next(trainer.prompts))
    aux = trainer.method.auxiliary_loss(batch, trainer.aux_ctx)
    lm = encode_targets(trainer.tokenizer, batch.examples)
    s = completion_logits(trainer.student, lm).double()
    t = completion_logits(trainer.teacher, lm).double()
    mask = lm.completion_mask.double()
    ce = torch.nn.functional.cross_entropy(s.transpose(1, 2), lm.completion_ids, reduction="none")
    fkl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    expected = 2.0 * (0.75 * (ce * mask).sum() + 0.25 * (fkl * mask).sum()) / mask.sum()
    assert aux.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"minillm/lm_ce", "minillm/lm_fkl", "minillm/lm_loss"} <= set(aux.metrics)
    metrics = trainer.train_step()
    assert "minillm/lm_loss" in metrics and math.isfinite(metrics["train/loss"])
