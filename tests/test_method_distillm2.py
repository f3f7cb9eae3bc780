"""DistiLLM-2: SKL on teacher batches, SRKL with a detached mixture on student batches, the (2−β)/β weights."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.losses.divergences import skew_reverse_kl
from opd.methods.distillm2 import DistiLLM2, skew_reverse_kl_detached
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2")


def random_batch(source: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    prompt = torch.ones(3, 2, dtype=torch.long)
    batch = RolloutBatch(prompt, prompt, ids, mask, [], source)
    return batch, 3 * torch.randn(3, 5, 8, generator=g), 3 * torch.randn(3, 5, 8, generator=g)


def reference(s, t, mask, source, alpha, num_tokens, detach=True):
    """Float64 KL(T‖αT+(1−α)S) on teacher batches, KL(S‖(1−α)T+α·sg[S]) on student batches; masked sum / num_tokens."""
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    if source == "teacher":
        kl = (p * (p.log() - (alpha * p + (1 - alpha) * q).log())).sum(-1)
    else:
        mix = (1 - alpha) * p + alpha * (q.detach() if detach else q)
        kl = (q * (q.log() - mix.log())).sum(-1)
    return (kl * mask.double()).sum() / num_tokens


@pytest.mark.parametrize("beta", [1.0, 0.5, 1.5])
@pytest.mark.parametrize("source", ["teacher", "student"])
def test_losses_and_weights_match_float64_reference(source, beta):
    batch, s, t = random_batch(source)
    out = DistiLLM2(beta=beta, skl_alpha=0.1, srkl_alpha=0.2).loss(batch, s, t, num_tokens=15)
    alpha, weight, key = (0.1, 2 - beta, "loss/skl") if source == "teacher" else (0.2, beta, "loss/srkl")
    expected = reference(s, t, batch.completion_mask, source, alpha, 15).item()
    assert out.loss.item() == pytest.approx(weight * expected, rel=1e-5)
    assert out.metrics[key] == pytest.approx(expected, rel=1e-5)
    assert set(out.metrics) == {key, f"distillm2/{source}_batches"}


def test_srkl_mixture_is_detached():
    batch, s, t = random_batch("student", seed=3)

    def grad(loss_fn):
        x = s.clone().double().requires_grad_(True)
        loss_fn(x).backward()
        return x.grad

    detached = grad(lambda x: DistiLLM2().loss(batch, x, t, 15).loss)
    live = grad(lambda x: DistiLLM2(detach_mixture=False).loss(batch, x, t, 15).loss)
    expected = grad(lambda x: reference(x, t, batch.completion_mask, "student", 0.1, 15, detach=True))
    expected_live = grad(lambda x: reference(x, t, batch.completion_mask, "student", 0.1, 15, detach=False))
    torch.testing.assert_close(detached, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(live, expected_live, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(detached, live, rtol=1e-3, atol=1e-5)
    # same value either way; alpha = 0 is plain reverse KL
    torch.testing.assert_close(skew_reverse_kl_detached(s, t, 0.1), skew_reverse_kl(s, t, 0.1))
    torch.testing.assert_close(skew_reverse_kl_detached(s, t, 0.0), skew_reverse_kl(s, t, 0.0))


def test_paired_batch_is_the_sum_of_its_teacher_and_student_halves():
    tb, s1, t1 = random_batch("teacher", seed=4)
    sb, s2, t2 = random_batch("student", seed=5)
    paired = RolloutBatch(torch.cat([tb.prompt_ids, sb.prompt_ids]), torch.cat([tb.prompt_mask, sb.prompt_mask]),
                          torch.cat([tb.completion_ids, sb.completion_ids]),
                          torch.cat([tb.completion_mask, sb.completion_mask]), [], "paired")
    paired.extras["from_teacher"] = torch.cat([torch.ones_like(tb.completion_mask), torch.zeros_like(sb.completion_mask)])
    method = DistiLLM2(beta=0.7)
    both = method.loss(paired, torch.cat([s1, s2]), torch.cat([t1, t2]), 20)
    halves = method.loss(tb, s1, t1, 20).loss + method.loss(sb, s2, t2, 20).loss
    assert both.loss.item() == pytest.approx(halves.item(), rel=1e-5)
    assert {"loss/skl", "loss/srkl"} <= set(both.metrics)


def test_schedules_pick_teacher_and_student_batches(compose_cfg):
    trainer = build_trainer(compose_cfg("method=distillm2", "method.schedule=alternate", *FAST))
    sources = [trainer.collect(next(trainer.prompts)).source for _ in range(4)]
    assert sources == ["teacher", "student", "teacher", "student"]
    assert trainer.method.state_dict()["policy"] == {"calls": 4}

    coin = build_trainer(compose_cfg("method=distillm2", "method.schedule=coin", *FAST))
    assert {coin.collect(next(coin.prompts)).source for _ in range(12)} == {"teacher", "student"}

    paired = build_trainer(compose_cfg("method=distillm2", "method.schedule=paired", *FAST))
    batch = paired.collect(next(paired.prompts))
    assert batch.source == "paired" and batch.completion_ids.shape[0] == 4
    assert batch.extras["from_teacher"][:, 0].tolist() == [1, 1, 0, 0]
    assert batch.examples[:2] == batch.examples[2:]  # the same prompts, answered by both
    assert torch.equal(batch.prompt_ids[:2], batch.prompt_ids[2:])


@pytest.mark.parametrize("schedule", ["alternate", "paired"])
def test_training_steps_apply_both_terms(compose_cfg, schedule):
    trainer = build_trainer(compose_cfg("method=distillm2", f"method.schedule={schedule}", "trainer.grad_accum=2", *FAST))
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and {"loss/skl", "loss/srkl"} <= set(metrics)
        assert metrics["train/loss"] == pytest.approx(metrics["loss/skl"] + metrics["loss/srkl"], rel=1e-5)  # β = 1


def test_default_config_trains_both_terms_in_every_optimizer_step(compose_cfg):
    """The paper sums SKL and SRKL in one gradient: with the default schedule and trainer.grad_accum=1 every step has both."""
    trainer = build_trainer(compose_cfg("method=distillm2", "trainer.grad_accum=1", *FAST))
    for _ in range(3):
        metrics = trainer.train_step()
        assert metrics["distillm2/teacher_batches"] >= 1 and metrics["distillm2/student_batches"] >= 1
        assert metrics["loss/skl"] > 0 and metrics["loss/srkl"] > 0
        assert metrics["train/loss"] == pytest.approx(metrics["loss/skl"] + metrics["loss/srkl"], rel=1e-5)  # β = 1


def test_bad_values_fail_at_build():
    with pytest.raises(ConfigError, match=r"beta must be in \[0, 2\]"):
        METHODS.build({"name": "distillm2", "beta": 2.5})
    with pytest.raises(ConfigError, match="schedule must be"):
        METHODS.build({"name": "distillm2", "schedule": "random"})
    with pytest.raises(ConfigError, match=r"srkl_alpha must be in \[0, 1\)"):
        METHODS.build({"name": "distillm2", "srkl_alpha": 1.0})
