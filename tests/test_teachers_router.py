"""Several teachers (issue 14 item 4, engine side): ``teachers:`` routes each example to the teacher named by its data
source, per-teacher metrics, and one-line refusals. Toy specialists: teacher=toy (arithmetic) and
teacher=toy_multiplication on ``data=mixture``; the references are each teacher's own HF model on its own rows."""

from __future__ import annotations

import math

import pytest
import torch
from test_teacher_registry import TOP_K, HFTopKTeacher

from opd.errors import ConfigError
from opd.models.scoring import completion_logits
from opd.teachers import SparseTeacherLogprobs
from opd.teachers.router import TeacherRouter
from opd.train import build_trainer

TWO = ("~teacher", "+teacher@teachers.arithmetic=toy", "+teacher@teachers.multiplication=toy_multiplication")
MIXED = ("data=mixture", "data.max_train_per_source=32", "trainer.batch_size=8", "sampler.max_new_tokens=8",
         "trainer.grad_accum=1", "trainer.max_grad_norm=0")


def routed_trainer(compose_cfg, *overrides: str):
    return build_trainer(compose_cfg(*TWO, *MIXED, *overrides, tiny_models=False))


def own_rows_loss(trainer, batch, name: str, teacher_model, sparse_k: int | None = None) -> tuple[int, float]:
    """(tokens, the method's loss per token) on the rows of source ``name``, scored by ``teacher_model`` directly."""
    rows = torch.tensor([i for i, ex in enumerate(batch.examples) if ex.source == name], dtype=torch.long)
    sub = batch.select(rows)
    with torch.no_grad():
        teacher = completion_logits(teacher_model, sub)
        if sparse_k is not None:
            teacher = SparseTeacherLogprobs.from_logits(teacher, sub, sparse_k)
        loss = trainer.method.loss(sub, completion_logits(trainer.student, sub), teacher, sub.num_tokens).loss.item()
    return sub.num_tokens, loss


def test_each_row_is_scored_by_its_sources_teacher(compose_cfg):
    """The step's loss is the token-weighted mean of each teacher's loss on its own rows (GKD: a token mean), and the
    per-teacher metrics are those numbers."""
    trainer = routed_trainer(compose_cfg, "method=gkd")
    router = trainer.teacher_component
    assert isinstance(router, TeacherRouter) and trainer.loss_path.teacher_output == "logits"
    assert trainer.teacher is None  # no single model: no teacher accuracy in the summary
    torch.manual_seed(0)
    batch = trainer.collect(next(trainer.prompts))
    assert {ex.source for ex in batch.examples} == {"arithmetic", "multiplication"}
    out = trainer.micro_batch_loss(batch, batch.num_tokens)
    want = {name: own_rows_loss(trainer, batch, name, router.teachers[name].model) for name in router.teachers}
    total = sum(tokens for tokens, _ in want.values())
    assert total == batch.num_tokens
    assert out.loss.item() == pytest.approx(sum(t * loss for t, loss in want.values()) / total, rel=1e-6)
    from opd.teachers.router import per_teacher_means

    metrics = per_teacher_means(out.metrics, batch.num_tokens)
    for name, (tokens, loss) in want.items():
        assert metrics[f"teacher/{name}/tokens"] == tokens
        assert metrics[f"teacher/{name}/loss"] == pytest.approx(loss, rel=1e-6)
    # the other teacher's logits would give another loss: the routing matters
    wrong = own_rows_loss(trainer, batch, "multiplication", router.teachers["arithmetic"].model)[1]
    assert not math.isclose(wrong, want["multiplication"][1], rel_tol=1e-3)


def test_a_starved_teacher_shows_zero_tokens_every_step(compose_cfg):
    with pytest.warns(UserWarning, match="teachers spare get no training example"):
        trainer = routed_trainer(compose_cfg, "method=gkd", "+teacher@teachers.spare=toy")
    metrics = trainer.train_step()
    assert metrics["teacher/spare/tokens"] == 0 and "teacher/spare/loss" not in metrics
    assert metrics["teacher/arithmetic/tokens"] + metrics["teacher/multiplication/tokens"] == metrics["train/tokens"]
    assert math.isfinite(metrics["teacher/arithmetic/loss"]) and math.isfinite(metrics["train/loss"])


def test_a_local_and_a_sparse_teacher_train_on_the_sparse_path(compose_cfg):
    """One teacher gives only top-k (a served kind's contract; here the test kind of test_teacher_registry.py): all rows
    go the sparse path, the local teacher giving its own top-k."""
    trainer = routed_trainer(compose_cfg, "method=kd", "+teachers.multiplication.kind=hf_topk_test",
                             f"+teachers.multiplication.top_k={TOP_K}")
    router = trainer.teacher_component
    assert isinstance(router.teachers["multiplication"], HFTopKTeacher) and trainer.loss_path.teacher_output == "sparse"
    torch.manual_seed(0)
    batch = trainer.collect(next(trainer.prompts))
    out = trainer.micro_batch_loss(batch, batch.num_tokens)
    want = {name: own_rows_loss(trainer, batch, name, router.teachers[name].model, sparse_k=TOP_K) for name in router.teachers}
    assert out.loss.item() == pytest.approx(sum(t * loss for t, loss in want.values()) / batch.num_tokens, rel=1e-6)


ROUTED = (*TWO, *MIXED)
TEACHERS_ONLY = TWO[1:] + ("trainer.batch_size=8",)


@pytest.mark.parametrize(("overrides", "message"), [
    (("method=gkd", *TEACHERS_ONLY), "set either teacher or teachers, not both: add ~teacher"),
    (("method=gkd", "~teacher", *TEACHERS_ONLY), "teachers: examples of source '' have no teacher (the data has no source"),
    (("method=gkd", *ROUTED, "data.tasks.multiplication.name=arithmetic", "~teachers.multiplication",
      "+teacher@teachers.arith=toy"), "examples of source 'multiplication' have no teacher"),
    (("method=seqkd", *ROUTED), "samples completions from the teacher (TeacherDecodePolicy), which teacher kind 'router'"),
    (("method=opsd", *ROUTED), "teachers: method 'opsd' distils from its own teacher (initial_student)"),
])
def test_impossible_routing_is_refused_in_one_line(compose_cfg, overrides, message):
    cfg = compose_cfg(*overrides, tiny_models=False)
    with pytest.raises(ConfigError) as err:
        build_trainer(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
