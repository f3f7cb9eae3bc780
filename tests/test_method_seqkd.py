"""SeqKD: the teacher writes the completions, the student takes cross-entropy on them, no teacher logits."""

from __future__ import annotations

import math

import pytest
import torch

from opd.errors import TrainingError
from opd.methods.seqkd import SeqKD
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=2")


def test_loss_is_masked_cross_entropy_float64_reference():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = RolloutBatch(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), ids, mask, [], "teacher")
    logits = 2 * torch.randn(2, 4, 6, generator=g)
    nll = -torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
    out = SeqKD().loss(batch, logits, None, num_tokens=10)
    assert out.loss.item() == pytest.approx((nll * mask).sum().item() / 10, rel=1e-6)
    assert out.metrics == {"loss/ce": pytest.approx(out.loss.item()), "seqkd/teacher_batches": 1.0}


def test_completions_come_from_the_teacher(compose_cfg, monkeypatch):
    trainer = build_trainer(compose_cfg("method=seqkd", *FAST))
    examples = trainer.task.train[:2]

    def sample(model=None):
        torch.manual_seed(123)
        if model is None:
            return trainer.collect(examples)
        return trainer.sampler.generate(model, trainer.tokenizer, examples)

    batch = sample()
    assert batch.source == "teacher"
    assert torch.equal(batch.completion_ids, sample(trainer.teacher).completion_ids)
    assert not torch.equal(batch.completion_ids, sample(trainer.student).completion_ids)

    # greedy: the same sampler, on the teacher, in greedy mode
    greedy = build_trainer(compose_cfg("method=seqkd", "method.greedy=true", *FAST))
    seen = []
    original = greedy.sampler.generate
    monkeypatch.setattr(greedy.sampler, "generate", lambda model, *a, **k: seen.append((model, k)) or original(model, *a, **k))
    assert greedy.collect(examples).source == "teacher"
    assert seen[0][0] is greedy.teacher and seen[0][1]["greedy"] is True


def test_training_steps_need_no_teacher_logits(compose_cfg, monkeypatch):
    trainer = build_trainer(compose_cfg("method=seqkd", *FAST))
    monkeypatch.setattr(trainer, "teacher_logits", lambda batch: pytest.fail("seqkd must not score with the teacher"))
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and metrics["loss/ce"] > 0
        assert metrics["seqkd/teacher_batches"] == 1.0


def test_without_a_teacher_model_it_fails_at_start_up(compose_cfg, tiny_model_dirs):
    cfg = compose_cfg("method=seqkd", "~teacher", f"student.name_or_path={tiny_model_dirs['student']}", *FAST,
                      tiny_models=False)
    with pytest.raises(TrainingError, match="'seqkd' needs a teacher model, but teacher is null"):
        build_trainer(cfg)
