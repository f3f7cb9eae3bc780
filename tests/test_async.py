"""Asynchronous rollouts (issue 15): ``trainer.max_staleness = N`` overlaps the next steps' rollouts with training.

1. The schedule: the batch of step k is sampled by the weights of step max(k − N, 0), regenerated here in-process
   from those weights and the job's seed; the prompt stream is the synchronous run's; the worker's recorded
   behaviour log-probs are those weights' log-probs.
2. Every registered method declares how it treats stale rollouts (``Method.staleness_handling``), and
   ``docs/methods.md`` says the same; a method that cannot run stale is refused at start-up in one line.
3. The losses use the behaviour policy's record only as declared: "as_is" / "recompute" losses never read it;
   "importance_ratio" ones equal the fresh loss at ratio 1 and move with q_old otherwise; tm_opd's stale loss
   equals an independent computation of the clipped ratio with the current student's reward.
4. Runs: a tiny model trains (its loss falls) with staleness ≤ N on every step; a non-finite step is skipped
   without stopping the worker; a failing worker's error reaches the learner; DeepSpeed ZeRO-2 over two processes
   runs with one worker per rank; a vLLM sampler and a served teacher work in the worker. SIGKILL-then-resume and
   SIGTERM with rollouts in flight are in tests/test_resume.py (parametrized over synchronous and asynchronous).
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import opd.methods  # noqa: F401  (registers every method)
from opd.engine.async_rollouts import job_seed
from opd.engine.checkpoint import list_checkpoints
from opd.errors import ConfigError, TrainingError
from opd.methods.base import Method
from opd.models.scoring import completion_logits, token_logprobs
from opd.registry import METHODS
from opd.sampling.hf import HFSampler
from opd.train import build_trainer, run

sys.path.insert(0, str(Path(__file__).parent))
from test_pitfalls import METHOD_NAMES, fixed_batch, make_trainer, step_gradients  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
SMALL = ("data.num_train=64", "data.num_eval=16", "trainer.batch_size=4", "trainer.eval_examples=8")


def default_method(name: str) -> Method:
    return METHODS.get(name)()


def train_steps(trainer, steps: int) -> tuple[list[dict], list[list], list[dict]]:
    """``steps`` train steps; (metrics, the batches each step trained on, the student's weights before each step)."""
    seen, weights, metrics = [], [], []
    accumulate = trainer.accumulate_gradients

    def record(batches, num_tokens):
        seen.append([copy.deepcopy(b) for b in batches])
        return accumulate(batches, num_tokens)

    trainer.accumulate_gradients = record
    for _ in range(steps):
        weights.append(copy.deepcopy(trainer.student.state_dict()))
        metrics.append(trainer.train_step())
    return metrics, seen, weights


# ---------------------------------------------------------------------------------------------- 1. the schedule
@pytest.mark.parametrize("name, extra", [("gkd", ()), ("tm_opd", ("method.clip_eps=0.2",))])
def test_each_batch_is_sampled_by_the_weights_n_steps_old(compose_cfg, name, extra):
    lookahead, steps = 2, 5
    cfg = compose_cfg(f"method={name}", *extra, *SMALL, "trainer.grad_accum=2", "trainer.lr=1e-2",
                      f"trainer.max_staleness={lookahead}", "trainer.max_steps=8")
    trainer = build_trainer(cfg)
    try:
        metrics, seen, weights = train_steps(trainer, steps)
    finally:
        trainer.close()
    sync = build_trainer(compose_cfg(f"method={name}", *extra, *SMALL, "trainer.grad_accum=2", "trainer.max_steps=8"))
    model = copy.deepcopy(trainer.student).eval()
    for step in range(steps):
        version = max(step - lookahead, 0)
        assert metrics[step]["rollout/staleness"] == step - version
        assert metrics[step]["rollout/policy_version"] == version
        model.load_state_dict(weights[version])
        for micro, batch in enumerate(seen[step]):
            assert batch.policy_version == version and batch.staleness == step - version
            # the synchronous run's prompt stream
            assert [e.prompt for e in batch.examples] == [e.prompt for e in next(sync.prompts)]
            torch.manual_seed(job_seed(cfg.seed, 0, step, micro))
            again = trainer.sampler.generate(model, trainer.tokenizer, batch.examples)
            assert torch.equal(again.completion_ids, batch.completion_ids), (step, micro)
            if name == "tm_opd":  # the behaviour log-probs are those weights' (the importance ratio's q_old)
                with torch.no_grad():
                    want = token_logprobs(completion_logits(model, batch), batch.completion_ids, batch.temperature)
                mask = batch.completion_mask.bool()
                torch.testing.assert_close(batch.sampler_logprobs[mask], want[mask], atol=1e-5, rtol=1e-5)
            else:
                assert batch.sampler_logprobs is None
    assert len({tuple(w["model.embed_tokens.weight"].flatten()[:5].tolist()) for w in weights}) == steps  # it learnt


# ---------------------------------------------------------------------------------------------- 2. declarations
def documented_handling() -> dict[str, str]:
    """method -> the handling column of docs/methods.md's "Stale rollouts" table."""
    text = DOCS.read_text()
    section = text.split("## Stale rollouts", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (?:\*\*)?`?(\w+)`?(?:\*\*)? \|", section, re.M)}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_declares_its_staleness_handling_and_the_docs_agree(name):
    method = default_method(name)
    handling = method.staleness_handling()
    assert handling in Method.STALENESS_HANDLINGS
    blocker = method.staleness_blocker()
    assert blocker is None or (blocker and "\n" not in blocker)
    docs = documented_handling()
    assert name in docs, f"docs/methods.md's 'Stale rollouts' table has no row for {name}"
    assert docs[name] == ("refused" if blocker else handling), (name, docs[name], handling, blocker)
    if handling == "importance_ratio":
        assert method.uses_sampled_token_logprobs


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if default_method(n).staleness_blocker()])
def test_a_method_that_cannot_run_stale_is_refused_in_one_line(compose_cfg, name):
    with pytest.raises(ConfigError) as err:
        build_trainer(compose_cfg(f"method={name}", "trainer.max_staleness=1"))
    message = str(err.value)
    assert "\n" not in message and f"'{name}'" in message and "trainer.max_staleness=0" in message


def test_an_unclipped_ratio_is_refused_and_the_clip_is_named(compose_cfg):
    with pytest.raises(ConfigError, match=r"method.clip_eps"):
        build_trainer(compose_cfg("method=tm_opd", "trainer.max_staleness=1"))
    with pytest.raises(ConfigError, match=r"schedule=alternate or coin"):
        build_trainer(compose_cfg("method=distillm2", "trainer.max_staleness=1"))
    build_trainer(compose_cfg("method=distillm2", "method.schedule=alternate", "trainer.max_staleness=1")).close()


# ---------------------------------------------------------------------------------------------- 3. the losses
ACCEPTED = [n for n in METHOD_NAMES if not default_method(n).staleness_blocker()
            or "clip_eps" in default_method(n).staleness_blocker()]


@pytest.mark.parametrize("name", ACCEPTED)
def test_stale_losses_read_the_behaviour_record_only_as_declared(compose_cfg, name):
    clip = ["method.clip_eps=0.2"] if "clip_eps" in (default_method(name).staleness_blocker() or "") else []
    trainer = make_trainer(compose_cfg, name, *clip)
    fresh = fixed_batch(trainer)
    fresh.sampler_logprobs = None
    with torch.no_grad():
        current = token_logprobs(completion_logits(trainer.student, fresh), fresh.completion_ids, fresh.temperature)
    ref_loss, ref_grads = step_gradients(trainer, [fresh])

    def stale(old_logprobs):
        batch = copy.deepcopy(fresh)
        batch.sampler_logprobs, batch.staleness, batch.policy_version = old_logprobs, 2, 0
        return step_gradients(trainer, [batch])

    shifted = current + 0.3 * torch.randn_like(current)  # an older policy's log-probs of the same tokens
    handling = trainer.method.staleness_handling()
    if handling in ("as_is", "recompute"):  # nothing of the behaviour policy enters the loss
        loss, grads = stale(shifted)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
    else:
        loss, grads = stale(current)  # ratio 1: the fresh loss, reward from the current student
        assert loss == pytest.approx(ref_loss, rel=1e-9)
        assert max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads) < 1e-9
        _, moved = stale(shifted)
        assert max(float((moved[k] - ref_grads[k]).abs().max()) for k in ref_grads) > 1e-6


def test_tm_opd_stale_loss_is_the_clipped_ratio_with_the_current_students_reward(compose_cfg):
    trainer = make_trainer(compose_cfg, "tm_opd", "method.clip_eps=0.2")
    batch = fixed_batch(trainer)
    with torch.no_grad():
        logq = token_logprobs(completion_logits(trainer.student, batch), batch.completion_ids, batch.temperature)
        logp = token_logprobs(completion_logits(trainer.teacher, batch), batch.completion_ids)
    old = logq + 0.5 * torch.randn_like(logq)
    batch.sampler_logprobs, batch.staleness = old, 1
    mask = batch.completion_mask.double()
    ratio = torch.exp(logq - old)
    advantage = -(logq - logp)  # kl_coef 1, the reward's log q from the current student
    per_token = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(0.8, 1.2))
    want = float((per_token * mask).sum() / mask.sum())
    loss, _ = step_gradients(trainer, [batch])
    assert loss == pytest.approx(want, rel=1e-5)  # log-probs are taken in float32
    # a fresh batch with the same record takes its reward from q_old instead (the recipe's)
    batch.staleness = 0
    advantage = -(old - logp)
    per_token = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(0.8, 1.2))
    assert step_gradients(trainer, [batch])[0] == pytest.approx(float((per_token * mask).sum() / mask.sum()), rel=1e-5)


# ---------------------------------------------------------------------------------------------- 4. runs
def test_an_async_run_trains_the_toy_student_within_the_staleness_bound(tmp_path):
    from hydra import compose, initialize_config_dir

    from opd.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "trainer.max_staleness=2", "trainer.max_steps=60", "trainer.eval_every=0", "trainer.eval_examples=32",
            "data.num_train=512", "trainer.progress=false", f"output_dir={tmp_path / 'run'}"])
    summary = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 60 and summary["steps"] == 60
    assert [r["rollout/staleness"] for r in train] == [0, 1] + [2] * 58
    first, last = (sum(r["train/loss"] for r in part) / 10 for part in (train[:10], train[-10:]))
    assert last < 0.9 * first, (first, last)  # the toy student is pretrained: its loss falls by ~20 % in 60 steps


def test_a_non_finite_step_is_skipped_and_the_worker_goes_on(compose_cfg):
    trainer = build_trainer(compose_cfg(*SMALL, "trainer.max_staleness=1", "trainer.max_steps=6"))
    loss = trainer.method.loss
    calls = {"n": 0}

    def nan_once(*args, **kwargs):
        out = loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    trainer.method.loss = nan_once
    try:
        before = None
        for step in range(5):
            if step == 1:
                before = copy.deepcopy(trainer.student.state_dict())
            metrics = trainer.train_step()
            if step == 1:
                assert metrics["train/skipped_steps"] == 1 and not math.isfinite(metrics["train/loss"])
                assert all(torch.equal(v, trainer.student.state_dict()[k]) for k, v in before.items())
            assert metrics["rollout/staleness"] <= 1
    finally:
        trainer.close()
    assert trainer.step == 5 and trainer.skipped_total == 1


class FailingSampler(HFSampler):
    """An HF sampler whose generate fails (pickled into the worker, where it raises)."""

    def generate(self, model, tokenizer, examples, greedy=False, n=None):
        raise RuntimeError("sampler exploded on purpose")


def test_a_failing_worker_reports_its_error_to_the_learner(compose_cfg):
    trainer = build_trainer(compose_cfg(*SMALL, "trainer.max_staleness=1", "trainer.max_steps=4"))
    trainer.rollouts.pipeline.spec.sampler = FailingSampler(max_new_tokens=8)  # the worker's copy of the sampler
    with pytest.raises(TrainingError, match="rollout worker failed: RuntimeError: sampler exploded on purpose"):
        trainer.train_step()
    trainer.close()


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])  # ZeRO-3: weights gathered to publish
def test_two_deepspeed_processes_each_with_a_rollout_worker(tmp_path, stage):
    from test_deepspeed import SHARD_ALL, metric_rows, torchrun

    out = tmp_path / "run"
    extra = [SHARD_ALL] if stage == 3 else []
    torchrun(f"deepspeed=zero{stage}", *extra, "debug=tiny", "trainer.max_staleness=1", "trainer.max_steps=4",
             "trainer.batch_size=4", "trainer.num_threads=1", "trainer.eval_examples=8", "trainer.save_every=2",
             f"output_dir={out}", cwd=tmp_path)
    rows = metric_rows(out)
    assert sorted(rows) == [1, 2, 3, 4]
    assert [rows[s]["rollout/staleness"] for s in sorted(rows)] == [0, 1, 1, 1]
    assert all(math.isfinite(r["train/loss"]) and r["train/tokens"] > 0 for r in rows.values())
    checkpoint = list_checkpoints(out)[0]  # step 2: each rank's in-flight rollouts of step 3
    for rank in (0, 1):
        assert sorted(torch.load(checkpoint / f"in_flight_rank{rank}.pt", weights_only=True)) == [2]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


@pytest.mark.vllm
def test_a_vllm_sampler_runs_in_the_worker_with_its_own_engine(compose_cfg, tmp_path):
    """sampler=vllm: the worker builds its own engine from its student copy and refreshes it for each new version;
    the learner's sampler never builds one."""
    pytest.importorskip("vllm")
    from test_vllm_sampler import STUDENT, load_student
    from transformers import AutoTokenizer

    student_dir = tmp_path / "wide_student"
    load_student().save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(STUDENT).save_pretrained(student_dir)
    cfg = compose_cfg("sampler=vllm", "trainer.max_steps=4", "sampler.max_new_tokens=24", "trainer.max_staleness=1",
                      "trainer.eval_every=0", f"student.name_or_path={student_dir}", tiny_models=False)
    trainer = build_trainer(cfg)
    try:
        metrics, seen, _ = train_steps(trainer, 4)
    finally:
        trainer.close()
    assert [m["rollout/staleness"] for m in metrics] == [0, 1, 1, 1]
    assert trainer.sampler.num_engines == 0  # the learner's sampler built no engine: the worker's did the sampling
    for batches in seen:  # vLLM's own record of q_old came back with every batch
        assert all(b.sampler_logprobs is not None and b.num_tokens > 0 for b in batches)


@pytest.mark.vllm
def test_a_served_teacher_is_asked_by_the_worker_right_after_sampling(vllm_teacher_server, compose_cfg):
    """teacher=vllm_server: the worker sends each batch to the server as soon as it is sampled, so the teacher's
    scoring overlaps the learner's step too; the scores it attaches are the server's for that batch, and the loss
    trained on them is the loss of the learner asking the server itself."""
    from conftest import VLLM_SERVER_MAX_LOGPROBS

    cfg = compose_cfg("teacher=vllm_server", "student=toy", f"teacher.server_url={vllm_teacher_server.base_url}",
                      "teacher.server_model=toy-teacher", f"teacher.server_top_k={VLLM_SERVER_MAX_LOGPROBS}",
                      "method.beta=0", *SMALL, "trainer.max_staleness=1", "trainer.max_steps=3", tiny_models=False)
    trainer = build_trainer(cfg)
    try:
        metrics, seen, _ = train_steps(trainer, 3)
    finally:
        trainer.close()
    assert [m["rollout/staleness"] for m in metrics] == [0, 1, 1]
    for batches in seen:
        for batch in batches:
            assert batch.teacher_scores is not None
            asked = trainer.teacher_component.score(copy.deepcopy(batch), "sparse")
            mask = batch.completion_mask.bool()
            torch.testing.assert_close(batch.teacher_scores.token_logprobs[mask], asked.token_logprobs[mask])
            assert torch.equal(batch.teacher_scores.topk_ids[mask], asked.topk_ids[mask])
            with torch.no_grad():
                on_worker = trainer.micro_batch_loss(batch, batch.num_tokens).loss.item()
                batch.teacher_scores = None
                on_learner = trainer.micro_batch_loss(batch, batch.num_tokens).loss.item()
            assert on_worker == pytest.approx(on_learner, rel=1e-6)
