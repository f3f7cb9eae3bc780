"""Word-level KD: τ²-scaled forward KL on dataset answers, optionally mixed with cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import ConfigError
from opd.methods.kd import KD
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2")


def random_batch(batch_size: int = 3, length: int = 5, vocab: int = 7, seed: int = 0):
    """(batch, student_logits, teacher_logits) with a ragged completion mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    prompt = torch.ones(batch_size, 2, dtype=torch.long)
    batch = RolloutBatch(prompt, prompt, ids, mask, [], "dataset")
    return batch, 3 * torch.randn(batch_size, length, vocab, generator=g), 3 * torch.randn(batch_size, length, vocab, generator=g)


def reference_kd(batch, s, t, temperature, ce_weight, num_tokens):
    """Float64 (1−w)·τ²·KL(T‖S) + w·CE, summed over masked positions and divided by num_tokens."""
    s64, t64 = s.double(), t.double()
    log_p = torch.log_softmax(t64 / temperature, -1)
    log_q = torch.log_softmax(s64 / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
    ce = -torch.log_softmax(s64, -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    m = batch.completion_mask.double()
    return ((1 - ce_weight) * (kl * m).sum() + ce_weight * (ce * m).sum()).item() / num_tokens


@pytest.mark.parametrize(("temperature", "ce_weight"), [(1.0, 0.0), (2.0, 0.0), (1.5, 0.3), (1.0, 1.0)])
def test_loss_matches_float64_reference(temperature, ce_weight):
    batch, s, t = random_batch()
    out = KD(temperature=temperature, ce_weight=ce_weight).loss(batch, s, t, num_tokens=20)
    assert out.loss.item() == pytest.approx(reference_kd(batch, s, t, temperature, ce_weight, 20), rel=1e-5)
    assert "loss/fkl" in out.metrics and (("loss/ce" in out.metrics) == (ce_weight > 0))


def test_ce_weight_mixes_kd_and_cross_entropy_linearly():
    batch, s, t = random_batch(seed=1)
    pure_kd = KD(ce_weight=0.0).loss(batch, s, t, 9)
    pure_ce = KD(ce_weight=1.0).loss(batch, s, t, 9)
    half = KD(ce_weight=0.5).loss(batch, s, t, 9)  # MiniLLM's KD baseline (kd_ratio 0.5)
    assert half.loss.item() == pytest.approx(0.5 * pure_kd.loss.item() + 0.5 * pure_ce.loss.item(), rel=1e-6)
    assert half.metrics["loss/fkl"] == pytest.approx(pure_kd.metrics["loss/fkl"])
    sft = METHODS.build({"name": "sft"}).loss(batch, s, None, 9)
    assert pure_ce.loss.item() == pytest.approx(sft.loss.item(), rel=1e-6)  # w = 1 is SFT


def test_t2_scaling_only_matters_away_from_temperature_one():
    batch, s, t = random_batch(seed=2)
    scaled = KD(temperature=2.0).loss(batch, s, t, 9).loss.item()
    unscaled = KD(temperature=2.0, scale_by_t2=False).loss(batch, s, t, 9).loss.item()
    assert scaled == pytest.approx(4 * unscaled, rel=1e-6)
    assert math.isclose(KD().loss(batch, s, t, 9).loss.item(), KD(scale_by_t2=False).loss(batch, s, t, 9).loss.item())


def test_bad_values_fail_at_build():
    with pytest.raises(ConfigError, match=r"ce_weight must be in \[0, 1\]"):
        METHODS.build({"name": "kd", "ce_weight": 1.5})
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        METHODS.build({"name": "kd", "temperature": 0.0})


def test_training_steps_on_dataset_answers(compose_cfg):
    trainer = build_trainer(compose_cfg("method=kd", "method.ce_weight=0.5", *FAST))
    assert trainer.collect(next(trainer.prompts)).source == "dataset"
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and {"loss/fkl", "loss/ce"} <= set(metrics)
        assert metrics["train/loss"] == pytest.approx(0.5 * metrics["loss/fkl"] + 0.5 * metrics["loss/ce"], rel=1e-5)
