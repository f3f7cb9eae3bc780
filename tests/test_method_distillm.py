"""DistiLLM: skew KL losses, the adaptive threshold fed by validation losses, the replay buffer."""

from __future__ import annotations

import math

import pytest
import torch

from opd.engine.evaluate import EvalResult
from opd.errors import ConfigError
from opd.methods.distillm import DistiLLM, DistiLLMReplayPolicy
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2", "trainer.validation_examples=8")


def random_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 9, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    prompt = torch.ones(3, 2, dtype=torch.long)
    batch = RolloutBatch(prompt, prompt, ids, mask, [], "student")
    return batch, 3 * torch.randn(3, 6, 9, generator=g), 3 * torch.randn(3, 6, 9, generator=g)


def reference_skew(s, t, mask, alpha, divergence, num_tokens, temperature=1.0):
    """Float64 KL(T‖αT+(1−α)S) (skl) or KL(S‖(1−α)T+αS) (srkl), masked sum / num_tokens."""
    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)
    lead, mix = (p, alpha * p + (1 - alpha) * q) if divergence == "skl" else (q, (1 - alpha) * p + alpha * q)
    kl = (lead * (lead.log() - mix.log())).sum(-1)
    return (kl * mask.double()).sum().item() / num_tokens


@pytest.mark.parametrize("divergence", ["skl", "srkl"])
@pytest.mark.parametrize(("alpha", "temperature"), [(0.1, 1.0), (0.0, 1.0), (0.5, 2.0)])
def test_skew_losses_match_float64_reference(divergence, alpha, temperature):
    batch, s, t = random_batch()
    out = DistiLLM(divergence=divergence, alpha=alpha, temperature=temperature).loss(batch, s, t, num_tokens=13)
    expected = reference_skew(s, t, batch.completion_mask, alpha, divergence, 13, temperature)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics[f"loss/{divergence}"] == pytest.approx(expected, rel=1e-5)
    assert out.metrics["distillm/student_batches"] == 1.0


def test_ce_weight_adds_cross_entropy():
    batch, s, t = random_batch(seed=1)
    base = DistiLLM().loss(batch, s, t, 10)
    mixed = DistiLLM(ce_weight=0.25).loss(batch, s, t, 10)
    assert mixed.loss.item() == pytest.approx(0.75 * base.loss.item() + 0.25 * mixed.metrics["loss/ce"], rel=1e-6)


def test_threshold_rises_when_validation_loss_rises_by_loss_eps():
    official = DistiLLMReplayPolicy("last_trigger", init_threshold=0.0, loss_eps=0.1)
    shared = DistiLLMReplayPolicy("last_eval", init_threshold=0.0, loss_eps=0.1)
    # 1.04 -> 1.12 triggers the official rule (>= 0.1 over the first evaluation), not the shared one (0.08 over the last)
    for loss, (official_threshold, shared_threshold) in zip(
            [1.0, 0.95, 1.04, 1.12, 1.15, 1.45, 1.3], [(0, 0), (0, 0), (0, 0), (0.1, 0), (0.1, 0), (0.2, 0.1), (0.2, 0.1)]):
        metrics = official.on_evaluate(loss)
        shared.on_evaluate(loss)
        assert official.threshold == pytest.approx(official_threshold) and shared.threshold == pytest.approx(shared_threshold)
        assert metrics["distillm/validation_loss"] == loss and metrics["distillm/threshold"] == official.threshold
    capped = DistiLLMReplayPolicy(init_threshold=0.95)  # θ is capped at 1
    capped.on_evaluate(1.0)
    capped.on_evaluate(2.0)
    assert capped.threshold == 1.0


def test_trainer_feeds_validation_losses_to_the_schedule(compose_cfg, monkeypatch):
    trainer = build_trainer(compose_cfg("method=distillm", *FAST))
    assert trainer.method.needs_validation_loss
    real = trainer.validation_loss()
    assert math.isfinite(real) and real > 0  # the method's SKL on held-out reference answers
    losses = iter([1.0, 1.2])
    monkeypatch.setattr(trainer, "validation_loss", lambda: next(losses))
    logged = []
    monkeypatch.setattr(trainer.logger, "log", lambda metrics, step: logged.append(metrics))
    result = EvalResult(accuracy=0.0, num_examples=1, mean_length=1.0, samples=[])
    trainer._log_eval(result)
    trainer._log_eval(result)
    assert trainer.method.policy.threshold == pytest.approx(0.1)
    assert logged[-1]["distillm/threshold"] == pytest.approx(0.1) and logged[-1]["distillm/validation_loss"] == 1.2


def test_buffer_fills_with_student_outputs_then_is_replayed(compose_cfg):
    cfg = compose_cfg("method=distillm", "method.init_threshold=1.0", "method.capacity=4",
                      "method.replay_ratio=increasing", *FAST)  # fresh-sample probability θ·f = 0 at step 0
    trainer = build_trainer(cfg)
    policy = trainer.method.policy
    fresh = [trainer.collect(next(trainer.prompts)) for _ in range(2)]
    assert [b.source for b in fresh] == ["student", "student"] and len(policy.buffer) == 4  # full
    stored = {(ex.prompt, tuple(ids)) for ex, ids in policy.buffer}
    for _ in range(3):
        replayed = trainer.collect(next(trainer.prompts))
        assert replayed.source == "replay"
        for ex, ids, mask in zip(replayed.examples, replayed.completion_ids.tolist(), replayed.completion_mask.tolist()):
            assert (ex.prompt, tuple(t for t, m in zip(ids, mask) if m)) in stored
    assert len(policy.buffer) == 4
    state = trainer.method.state_dict()
    assert len(state["policy"]["buffer"]) == 4 and state["policy"]["threshold"] == 1.0


@pytest.mark.parametrize("divergence", ["skl", "srkl"])
def test_training_steps_mix_sources_and_log_the_divergence(compose_cfg, divergence):
    trainer = build_trainer(compose_cfg("method=distillm", f"method.divergence={divergence}",
                                        "method.init_threshold=0.6", "method.capacity=2", "trainer.grad_accum=2", *FAST))
    seen = set()
    for _ in range(3):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and metrics[f"loss/{divergence}"] >= 0
        assert metrics["train/loss"] == pytest.approx(metrics[f"loss/{divergence}"], rel=1e-5)
        seen |= {k for k in metrics if k.startswith("distillm/") and k.endswith("_batches")}
    assert seen  # which sources came up depends on the coin; every step logs its batches


def test_bad_values_fail_at_build():
    with pytest.raises(ConfigError, match="divergence must be 'skl' or 'srkl'"):
        METHODS.build({"name": "distillm", "divergence": "fkl"})
    with pytest.raises(ConfigError, match="reference_loss"):
        METHODS.build({"name": "distillm", "reference_loss": "best"})
    with pytest.raises(ConfigError, match="replay_ratio"):
        METHODS.build({"name": "distillm", "replay_ratio": "sometimes"})
