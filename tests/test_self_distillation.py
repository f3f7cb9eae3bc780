"""The self-distillation family: SDFT's and SDPO's terms against independent computations and identities, the ``live``
and ``ema`` teacher kinds (following the student, exact resume), SDPO's rewards and reprompts, and TRL parity."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from opd.losses.divergences import forward_kl, generalized_jsd, reverse_kl  # float32 library path
from opd.losses.self_distillation import (
    full_self_distillation,
    importance_clip_weights,
    sampled_token_self_distillation,
    topk_self_distillation,
    with_tail_bucket,
)
from opd.methods.sdft import self_distillation_terms
from opd.methods.sdpo import SDPO, group_bounds
from opd.train import build_trainer
from opd.types import Example, RolloutBatch

ROOT = Path(__file__).resolve().parent.parent


def logits(seed: int, shape=(3, 4, 11), dtype=torch.float64) -> torch.Tensor:
    return 2.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_divergence(log_s: torch.Tensor, log_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1−α)·KL(S‖M) + α·KL(T‖M), M = (1−α)·S + α·T, in probabilities (not log space), the KLs at the ends."""
    s, t = log_s.exp(), log_t.exp()
    if alpha == 0.0:
        return (t * (log_t - log_s)).sum(-1)
    if alpha == 1.0:
        return (s * (log_s - log_t)).sum(-1)
    m = (1 - alpha) * s + alpha * t
    return (1 - alpha) * (s * (s / m).log()).sum(-1) + alpha * (t * (t / m).log()).sum(-1)


# ------------------------------------------------------------------------------------------------ the terms
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_full_term_is_the_forward_kl_the_jsd_and_the_reverse_kl(alpha):
    """α = 0 is KL(T‖S), α = 1 KL(S‖T), between the JSD of GKD at β = α, all against a computation in probabilities
    (float64, so 1e-12 is rounding)."""
    s, t = logits(0), logits(1)
    got = full_self_distillation(s, t, alpha)
    want = reference_divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1), alpha)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    named = {0.0: forward_kl(s, t), 1.0: reverse_kl(s, t)}.get(alpha, generalized_jsd(s, t, alpha))
    torch.testing.assert_close(got, named.to(got.dtype), rtol=1e-6, atol=1e-7)  # float32 library path


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_on_the_whole_vocabulary_is_the_full_term(alpha):
    """With k = V the renormalised top-k is the full divergence exactly, and the tail bucket adds one empty category
    (its mass capped at e^-1e-7 ≈ 1e-7 of missing mass: an error of that order)."""
    s, t = logits(2), logits(3)
    full = full_self_distillation(s, t, alpha)
    torch.testing.assert_close(topk_self_distillation(s, t, s.shape[-1], alpha, tail=False), full, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(topk_self_distillation(s, t, s.shape[-1], alpha, tail=True), full, rtol=0, atol=1e-5)


def test_topk_reads_the_students_support_only():
    """The support is the student's top k (as TRL's SDFT, not the teacher's): changing the teacher outside it leaves the
    renormalised term unchanged; changing it inside changes the term."""
    s, t = logits(4), logits(5)
    k = 4
    inside = torch.zeros_like(s, dtype=torch.bool).scatter(-1, s.topk(k, dim=-1).indices, True)
    base = topk_self_distillation(s, t, k, 0.5, tail=False)
    outside_changed = torch.where(inside, t, t + 3.0 * logits(6))
    torch.testing.assert_close(topk_self_distillation(s, outside_changed, k, 0.5, tail=False), base, rtol=1e-12,
                               atol=1e-12)
    inside_changed = torch.where(inside, t + 3.0 * logits(6), t)
    assert (topk_self_distillation(s, inside_changed, k, 0.5, tail=False) - base).abs().max() > 1e-3


def test_the_tail_bucket_completes_a_distribution():
    log_p = torch.log_softmax(logits(7), -1)[..., :5]  # five entries of an 11-way distribution
    completed = with_tail_bucket(log_p)
    assert completed.shape[-1] == 6
    torch.testing.assert_close(completed.exp().sum(-1), torch.ones(completed.shape[:-1], dtype=completed.dtype))
    torch.testing.assert_close(completed[..., -1].exp(), 1 - log_p.exp().sum(-1))


def test_the_sampled_token_term_has_the_reverse_kl_reinforce_gradient():
    """Its value is sg[log q − log p]·log q; its gradient (log q − log p)·∇log q, the per-token REINFORCE gradient of
    the reverse KL, averaged over samples of q it is the exact reverse-KL gradient (checked on the expectation)."""
    s, t = logits(8, (1, 1, 6)), logits(9, (1, 1, 6))
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    # expectation over every token y under q: Σ_y q(y)·term(y); its gradient must equal ∇ KL(q‖p)
    leaf = s.clone().requires_grad_(True)
    lq = torch.log_softmax(leaf, -1)
    terms = sampled_token_self_distillation(lq[0, 0], log_p[0, 0])  # [V]: every token as the sampled one
    expected = (log_q.exp()[0, 0].detach() * terms).sum()
    (grad,) = torch.autograd.grad(expected, leaf)
    leaf2 = s.clone().requires_grad_(True)
    lq2 = torch.log_softmax(leaf2, -1)
    (want,) = torch.autograd.grad((lq2.exp() * (lq2 - log_p)).sum(), leaf2)  # ∇ KL(q‖p), float64
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms, (log_q - log_p)[0, 0] * log_q[0, 0])


def test_the_importance_weight_is_clipped_above_and_detached():
    student = torch.tensor([0.0, -1.0, -5.0, -60.0], requires_grad=True)
    behaviour = torch.tensor([0.0, -2.0, -1.0, 0.0])
    weights = importance_clip_weights(student, behaviour, clip=2.0)
    want = torch.tensor([1.0, 2.0, torch.exp(torch.tensor(-4.0)).item(), torch.exp(torch.tensor(-20.0)).item()])
    torch.testing.assert_close(weights, want)  # e^1 clipped to 2; the log-ratio −60 clamped to −20
    assert not weights.requires_grad


def test_the_method_term_divides_by_the_temperature_and_weighs_by_the_sampler(tmp_path):
    """``self_distillation_terms`` (SDFT and SDPO) equals the terms on logits / τ, times min(q/q_old, clip) where the
    sampler recorded q_old, and is unweighted without a record."""
    s, t = logits(10, (2, 3, 9)), logits(11, (2, 3, 9))
    ids = torch.randint(9, (2, 3), generator=torch.Generator().manual_seed(0))
    batch = RolloutBatch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), ids,
                         torch.ones(2, 3, dtype=torch.long), [Example("p", "t", "a")] * 2, "student", temperature=0.5)
    method = types.SimpleNamespace(mode="full_logits", top_k=0, tail=False, alpha=0.5, is_clip=2.0)
    plain, logq = self_distillation_terms(method, batch, s, t)
    torch.testing.assert_close(plain, full_self_distillation(s / 0.5, t / 0.5, 0.5))
    batch.sampler_logprobs = logq.detach() - torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.0, 0.0]], dtype=logq.dtype)
    weighted, _ = self_distillation_terms(method, batch, s, t)
    ratio = torch.tensor([[2.0, 1.0, torch.exp(torch.tensor(-1.0)).item()], [torch.exp(torch.tensor(0.2)).item(), 1, 1]],
                         dtype=plain.dtype)
    # the importance ratio is computed in float32 (opd's convention for every ratio): ~1e-6 relative
    torch.testing.assert_close(weighted, plain * ratio, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------ SDPO's groups
class CountingTask:
    """A task whose answer is correct when the completion equals the example's answer."""

    def score(self, completion: str, example: Example) -> float:
        return float(completion == example.answer)

    def feedback(self, completion: str, example: Example) -> str:
        return f"expected {example.answer}"


class CharTokenizer:
    """decode() of ids as characters (0-9 and 'x'), enough for SDPO's reprompts."""

    alphabet = "0123456789x"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids)


def grouped_batch(completions: list[str], examples: list[Example]) -> RolloutBatch:
    width = max(map(len, completions))
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, text in enumerate(completions):
        ids[i, :len(text)] = torch.tensor([CharTokenizer.alphabet.index(c) for c in text])
        mask[i, :len(text)] = 1
    return RolloutBatch(torch.zeros(len(ids), 1, dtype=torch.long), torch.ones(len(ids), 1, dtype=torch.long), ids, mask,
                        examples, "student")


def test_sdpo_rewards_advantages_and_reprompts_follow_the_group():
    """Rows of one prompt form a group: advantages are (R − mean)/(std + 1e-4) within it; a row's reprompt shows the
    first *other* successful sibling, a failed row also gets the checker's feedback, and a lone success gets none."""
    a, b = Example("2+2=", "4", "4"), Example("3+3=", "6", "6")
    batch = grouped_batch(["4", "5", "4", "7", "6"], [a, a, a, b, b])
    assert group_bounds(batch.examples) == [(0, 3), (3, 5)]
    method = SDPO(reprompt_template="[{prompt}|{solution}|{feedback}]", solution_template="S:{attempt}",
                  feedback_template="F:{feedback}")
    method.bind(CountingTask(), CharTokenizer())
    context = method.group_context(batch)
    assert context.rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    group_a = torch.tensor([1.0, 0.0, 1.0])
    want_a = (group_a - group_a.mean()) / (group_a.std() + 1e-4)
    torch.testing.assert_close(context.advantages[:3], want_a)
    assert context.reprompts == ["[2+2=|S:4|]",           # success: the other success is its demonstration
                                 "[2+2=|S:4|F:expected 4]",  # failure: a demonstration and feedback
                                 "[2+2=|S:4|]",
                                 "[3+3=|S:6|F:expected 6]",
                                 None]                     # the group's only success: nothing to show it
    assert context.successful_groups == 2 and context.groups == 2


def test_sdpo_without_distillation_is_the_group_relative_policy_gradient():
    """distillation_weight = 0: the loss is −Σ A·ratio over tokens / N (ratio 1 on fresh samples), whatever the teacher."""
    a = Example("2+2=", "4", "4")
    batch = grouped_batch(["4", "51", "44"], [a, a, a])
    method = SDPO(distillation_weight=0.0)
    method.bind(CountingTask(), CharTokenizer())
    student = logits(12, (3, 2, 11)).requires_grad_(True)
    out = method.loss(batch, student, logits(13, (3, 2, 11)), num_tokens=batch.num_tokens)
    rewards = torch.tensor([1.0, 0.0, 0.0])
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    want = -(advantages[:, None] * batch.completion_mask).sum() / batch.num_tokens
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype))
    other = method.loss(batch, student, logits(14, (3, 2, 11)), num_tokens=batch.num_tokens)
    torch.testing.assert_close(other.loss, out.loss)


# ------------------------------------------------------------------------------------------------ teacher kinds
def test_the_live_teacher_is_the_student_now(compose_cfg):
    trainer = build_trainer(compose_cfg("method=sdft", "method.teacher_model=live"))
    assert trainer.teacher is trainer.student
    batch = trainer.collect(next(trainer.prompts))
    before = trainer.teacher_component.score(batch, "logits")
    trainer.train_step()
    after = trainer.teacher_component.score(batch, "logits")
    assert (after - before).abs().max() > 1e-6  # it moved with the student
    with torch.no_grad():
        from opd.models.scoring import completion_logits
        student_now = completion_logits(trainer.student, batch)
    torch.testing.assert_close(after, student_now[..., :after.shape[-1]])


def ema_run(compose_cfg, tiny_model_dirs, *overrides: str):
    """A run config whose teacher group is ``ema`` (so its keys can be set) with the tiny random student."""
    return compose_cfg("teacher=ema", f"student.name_or_path={tiny_model_dirs['student']}", *overrides, tiny_models=False)


def test_the_ema_teacher_follows_the_student_at_its_rate(compose_cfg, tiny_model_dirs):
    """After each update θ_T ← (1 − α)·θ_T + α·θ_S (α = update_rate), every sync_every steps only."""
    trainer = build_trainer(ema_run(compose_cfg, tiny_model_dirs, "method=sdpo", "teacher.update_rate=0.25",
                                    "teacher.sync_every=2", "sampler.n=2"))
    teacher = trainer.teacher_component
    assert teacher.kind == "ema" and teacher.model is not trainer.student
    name = teacher.pairs[0][0]
    track = lambda model: dict(model.named_parameters())[name].detach().clone()  # noqa: E731
    t0, s0 = track(teacher.model), track(trainer.student)
    torch.testing.assert_close(t0, s0)  # it starts as the student
    trainer.train_step()
    torch.testing.assert_close(track(teacher.model), t0)  # step 1: no sync (every 2)
    trainer.train_step()
    s2 = track(trainer.student)
    assert (s2 - s0).abs().max() > 0
    torch.testing.assert_close(track(teacher.model), 0.75 * t0 + 0.25 * s2)


def test_the_ema_teacher_resumes_exactly(compose_cfg, tiny_model_dirs, tmp_path):
    """Four steps in one go, or two, a checkpoint, and two more in a new trainer: the same teacher and student, bit for
    bit (one machine, one seed)."""
    common = ("method=sdpo", "teacher.update_rate=0.3", "sampler.n=2", "trainer.keep_checkpoints=5")
    straight = build_trainer(ema_run(compose_cfg, tiny_model_dirs, *common, f"output_dir={tmp_path / 'a'}"))
    for _ in range(4):
        straight.train_step()
    first = build_trainer(ema_run(compose_cfg, tiny_model_dirs, *common, f"output_dir={tmp_path / 'b'}"))
    for _ in range(2):
        first.train_step()
    checkpoint = first.save()
    second = build_trainer(ema_run(compose_cfg, tiny_model_dirs, *common, f"output_dir={tmp_path / 'c'}"))
    second.restore(checkpoint)
    for _ in range(2):
        second.train_step()
    for (name, a), b in zip(straight.teacher_component.model.named_parameters(),
                            second.teacher_component.model.parameters()):
        assert torch.equal(a, b), f"EMA teacher tensor {name} differs after the resume"
    for a, b in zip(straight.student.parameters(), second.student.parameters()):
        assert torch.equal(a, b)


def test_an_ema_teacher_checkpoint_is_needed_to_resume(compose_cfg, tmp_path):
    from opd.errors import ConfigError

    plain = build_trainer(compose_cfg("method=sdft", f"output_dir={tmp_path / 'a'}"))
    plain.train_step()
    checkpoint = plain.save()
    ema = build_trainer(compose_cfg("method=sdft", "method.teacher_model=ema", f"output_dir={tmp_path / 'b'}"))
    with pytest.raises(ConfigError, match="no EMA teacher"):
        ema.restore(checkpoint)


def test_bad_self_distillation_settings_are_refused_in_one_line(compose_cfg, tiny_model_dirs):
    from opd.errors import ConfigError

    for overrides, message in [
        (("method=sdft", "method.mode=sampled_token"), "alpha=1.0"),
        (("method=sdft", "method.top_k=27"), "top_k = 27 exceeds the vocabulary size V = 26"),
        (("method=sdft", "method.teacher_model=hf"), "teacher_model must be one of"),
        (("method=sdpo", "method.reprompt_template='{prompt} {question}'"), "unknown placeholder"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_trainer(compose_cfg(*overrides))
    with pytest.raises(ConfigError, match=r"teacher \(kind ema\): teacher.update_rate must be in \(0, 1\]"):
        build_trainer(ema_run(compose_cfg, tiny_model_dirs, "method=sdft", "method.teacher_model=ema",
                              "teacher.update_rate=2"))


def test_generate_from_teacher_samples_under_the_teachers_prompt_and_trains_under_the_students(compose_cfg):
    trainer = build_trainer(compose_cfg("method=sdft", "method.generate_from_teacher=true"))
    examples = next(trainer.prompts)
    batch = trainer.collect(examples)
    own = trainer.tokenizer([ex.prompt for ex in examples], add_special_tokens=True)["input_ids"]
    for row, ids in enumerate(own):  # the batch holds the student's own prompt, left-padded
        assert batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist() == ids
    assert batch.sampler_logprobs is None  # not the student's own samples: no importance weight
    assert trainer.train_step()["train/tokens"] > 0


@pytest.mark.parametrize("method", ["sdft", "sdpo"])
def test_self_distillation_runs_train_the_student(compose_cfg, method):
    """A few steps move the student's weights and log the method's terms; the loss stays finite."""
    trainer = build_trainer(compose_cfg(f"method={method}", "sampler.n=2"))
    before = [p.detach().clone() for p in trainer.student.parameters()]
    rows = [trainer.train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in rows)
    assert any((a - b).abs().max() > 0 for a, b in zip(before, trainer.student.parameters()))
    key = "loss/self_distillation" if method == "sdpo" else "loss/sdft_topk_logits"
    assert key in rows[-1]


# ------------------------------------------------------------------------------------------------ TRL parity
def test_sdft_and_sdpo_terms_match_trl():
    """opd's terms equal TRL 1.16's ``loss_utils`` (SDFT's and SDPO's) for every mode, α, tail and clip, to 1e-6
    relative in float64 (measured 1e-14), in the TRL venv of `make bench-trl` (the script exits 1 otherwise)."""
    if not list((ROOT / ".venv-trl").glob("lib/python*/site-packages/trl")):
        pytest.skip("needs the TRL venv: make bench-trl")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "self_distillation_parity.py"), "--seeds", "0"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASS" in result.stdout.splitlines()[-1]
    json.dumps(result.stdout)  # printable


def test_an_ema_teacher_of_a_lora_student_averages_the_adapters_only(compose_cfg, tiny_model_dirs):
    """A LoRA student's trainable tensors are its adapters: the EMA copy averages (and checkpoints) those alone, and its
    frozen base stays the student's."""
    trainer = build_trainer(ema_run(compose_cfg, tiny_model_dirs, "method=sdpo", "teacher.update_rate=0.5",
                                    "sampler.n=2", "student.lora.r=4"))
    teacher = trainer.teacher_component
    assert teacher.pairs and all("lora_" in name for name, _, _ in teacher.pairs)
    trainer.train_step()
    moved = [name for name, source, target in teacher.pairs if (target - source).abs().max() > 0]
    assert moved  # half-way between its old value and the student's
    student = dict(trainer.student.named_parameters())
    for name, param in teacher.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, student[name]), f"the frozen base tensor {name} differs"
    assert set(teacher.state_dict()["averaged"]) == {name for name, _, _ in teacher.pairs}
