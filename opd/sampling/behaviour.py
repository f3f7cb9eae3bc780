"""Behaviour policies: who writes the completions a method trains on (the first axis of METHODS.md).

A method holds one policy; the trainer calls ``policy.collect(ctx, examples)`` for every micro-batch.

| policy            | completions come from                                    | used by          |
|-------------------|----------------------------------------------------------|------------------|
| ``DatasetPolicy`` | the dataset's reference answers (off-policy)             | sft, kd          |
| ``StudentPolicy`` | the current student, through the configured sampler      | on-policy methods|
| ``TeacherPolicy`` | the teacher, through the sampler                         | seqkd            |
| ``LambdaMixture`` | student with probability λ per batch, else another policy| gkd              |
| ``TeacherMixedPolicy`` | each token from α·p_T + (1−α)·q_θ (joint decoding)  | minillm          |
| ``AdaptiveReplayPolicy`` | fresh student samples, a replay buffer, or data, by an adaptive threshold | distillm |
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from opd import distributed as dist
from opd.sampling.base import eos_id_tensor, eos_token_ids, truncate_after_eos
from opd.sampling.tokenize import encode_prompts, encode_targets, left_pad
from opd.types import Example, RolloutBatch


@dataclasses.dataclass
class OwnTokensTeacher:
    """A teacher whose tokenizer is not the student's, as a writer of completions (SeqKD across tokenizers): it samples
    in its own tokens from its own rendering of the prompt, and the student trains on the text."""

    model: torch.nn.Module
    tokenizer: Any
    #: an example's prompt in the teacher's tokens (``opd.teachers.hf.HFTeacher.own_prompt``)
    prompt_ids: Callable[[Example], list[int]]


@dataclasses.dataclass
class RolloutContext:
    """What a policy may use to write completions (filled by the trainer)."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    tokenizer: Any
    sampler: Any
    device: torch.device
    rng: random.Random
    step: int = 0
    max_steps: int = 1
    task: Any = None  # the run's task (its answer checker: rejection-sampled SeqKD keeps only correct samples)
    #: who writes the student's samples: None = ``sampler`` with the current weights, here and now; the engine's rollout
    #: worker sets a function that queues them for the worker instead (``opd.engine.rollouts.WorkerRollouts``)
    student_rollouts: Callable[[list[Example]], Any] | None = None
    #: set when the teacher reads another tokenizer: it then writes its samples as text (:meth:`sample_teacher`)
    own_tokens_teacher: OwnTokensTeacher | None = None

    def sample_student(self, examples: list[Example]) -> RolloutBatch:
        """The student's on-policy samples of ``examples`` (or, with a rollout worker, the placeholder it fills)."""
        if self.student_rollouts is not None:
            return self.student_rollouts(examples)
        return self.sampler.generate(self.student, self.tokenizer, examples)

    def sample_teacher(self, examples: list[Example], greedy: bool = False, n: int | None = None) -> RolloutBatch:
        """The teacher's samples of ``examples`` in the student's tokens (``source="teacher"``, no ``sampler_logprobs``:
        those are the student's q_old by contract), ``n`` per example (the sampler's when None), rows grouped by example.

        With one tokenizer the sampler decodes the teacher on the student's prompt ids. With a teacher that reads
        another tokenizer (:attr:`own_tokens_teacher`), the teacher samples in its own tokens from its own prompt,
        its completion is decoded to text (special tokens left out) and the text is tokenized for the student: a row
        that ended at one of the teacher's EOS ids ends with the student's EOS; a row cut at ``max_new_tokens`` (the
        teacher's tokens) gets none, so it counts as cut, as a sampled row does.
        """
        writer = self.own_tokens_teacher
        if writer is None:
            batch = self.sampler.generate(self.teacher, self.tokenizer, examples, greedy=greedy, n=n)
        else:
            prompts = left_pad([writer.prompt_ids(example) for example in examples], writer.tokenizer.pad_token_id)
            own = self.sampler.generate(writer.model, writer.tokenizer, examples, greedy=greedy, n=n, prompts=prompts)
            ends = set(eos_token_ids(writer.tokenizer, writer.model))
            texts, finished = [], []
            for ids, mask in zip(own.completion_ids, own.completion_mask):
                kept = ids[mask.bool()].tolist()
                finished.append(bool(kept) and kept[-1] in ends)
                texts.append(writer.tokenizer.decode(kept, skip_special_tokens=True))
            batch = encode_targets(self.tokenizer, list(own.examples), self.device, targets=texts, finished=finished)
            batch.temperature = own.temperature
        batch.source, batch.sampler_logprobs = "teacher", None
        return batch


class BehaviourPolicy:
    """Base class: ``collect`` writes completions; optional state for resumption and evaluation feedback."""

    #: whether ``collect`` samples from the teacher model (the trainer then requires one at start-up).
    uses_teacher: bool = False
    #: whether every teacher sample is a whole completion (:meth:`RolloutContext.sample_teacher`), which a teacher with
    #: another tokenizer can write as text; False for token-by-token joint decoding, which needs one vocabulary
    teacher_writes_text: bool = True

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        raise NotImplementedError

    def async_blocker(self) -> str | None:
        """Why the rollout worker (``trainer.max_staleness > 0``, the engine's ``async_rollouts``) cannot write this
        policy's student rollouts, or None if it can.

        The worker holds only a copy of the student and the sampler. At submission time ``collect`` runs on the
        learner with a context whose :meth:`RolloutContext.sample_student` queues a job for the worker and returns a
        placeholder, so a policy qualifies only if it returns the student's batch untouched (it may also write
        other batches itself: dataset answers, teacher samples). One line, read at start-up.
        """
        return "its rollouts are not plain student samples that the rollout worker could write"

    def on_evaluate(self, validation_loss: float) -> dict[str, float]:
        """Feedback after each evaluation (DistiLLM's adaptive schedule); returns metrics to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DatasetPolicy(BehaviourPolicy):
    """The dataset's reference completions (off-policy, teacher-forced)."""

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        return encode_targets(ctx.tokenizer, examples, ctx.device)

    def async_blocker(self) -> str | None:
        return "its completions are the dataset's answers: there are no student rollouts to overlap with training"


class StudentPolicy(BehaviourPolicy):
    """Samples from the current student with the configured sampler (on-policy)."""

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        return ctx.sample_student(examples)

    def async_blocker(self) -> str | None:
        return None


class TeacherPolicy(BehaviourPolicy):
    """Samples from the teacher with the configured sampler (sequence-level KD).

    The batch is labelled ``source="teacher"`` and carries no ``sampler_logprobs`` (those are the
    student's q_old by contract; a vLLM engine's record here would be the teacher's).
    """

    uses_teacher = True

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        return ctx.sample_teacher(examples)

    def async_blocker(self) -> str | None:
        return "its completions are the teacher's samples: there are no student rollouts to overlap with training"


class LambdaMixture(BehaviourPolicy):
    """GKD's coin: with probability ``lmbda`` the student samples this batch, otherwise ``off_policy`` writes it.

    Args:
        lmbda: probability of a student-sampled batch, in [0, 1].
        off_policy: the policy used otherwise (dataset or teacher).
    """

    def __init__(self, lmbda: float, off_policy: BehaviourPolicy) -> None:
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        self.lmbda, self.off_policy, self.student = lmbda, off_policy, StudentPolicy()
        self.uses_teacher, self.teacher_writes_text = off_policy.uses_teacher, off_policy.teacher_writes_text

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        chosen = self.student if ctx.rng.random() < self.lmbda else self.off_policy
        return chosen.collect(ctx, examples)

    def async_blocker(self) -> str | None:
        """The coin is flipped at submission; student batches go to the worker, the others are written then."""
        if self.lmbda == 0.0:
            return "lmbda=0: every batch comes from the off-policy source, there are no student rollouts to overlap"
        return None


class TeacherMixedPolicy(BehaviourPolicy):
    """MiniLLM's teacher-mixed sampling (Gu et al. 2024, Eq. 4): each token from p̃ = α·p_T + (1−α)·q_θ.

    Student and teacher decode jointly, each with its own KV cache. The batch records, per completion
    token, the student's log-probability at sampling time (``sampler_logprobs``, the q_old of the
    importance ratio) and the mixture's (``extras["mix_logprobs"]``), so the single-step importance
    weight q_θ/p̃ can be formed by the method. Decoding uses the HF models themselves, never the
    configured sampler's engine (only its ``max_new_tokens`` and ``temperature``), so with
    ``sampler=vllm`` the student and teacher here are always the current ones. A row ends at the
    first EOS either model declares (:func:`~opd.sampling.base.eos_token_ids` of both): past the
    teacher's end its p_T is meaningless, past the student's its q_θ is.

    Args:
        alpha: teacher weight α of the mixture (0.2 in all MiniLLM experiments).
    """

    uses_teacher = True
    teacher_writes_text = False  # p̃ mixes the two models' distributions over one vocabulary, token by token

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    @torch.no_grad()
    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        tok, sampler = ctx.tokenizer, ctx.sampler
        prompt_ids, prompt_mask = encode_prompts(tok, [ex.prompt for ex in examples], ctx.device)
        eos = eos_token_ids(tok, ctx.student, ctx.teacher)
        was_training = ctx.student.training
        ctx.student.eval()
        try:
            tokens, student_lp, mix_lp = joint_decode(ctx.student, ctx.teacher, prompt_ids, prompt_mask,
                                                      sampler.max_new_tokens, self.alpha, sampler.temperature,
                                                      eos, tok.pad_token_id)
        finally:
            ctx.student.train(was_training)
        completion_ids, completion_mask = truncate_after_eos(tokens, eos, tok.pad_token_id)
        batch = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, list(examples), "mixed",
                             temperature=sampler.temperature)
        batch.sampler_logprobs = student_lp
        batch.extras["mix_logprobs"] = mix_lp
        return batch

    def async_blocker(self) -> str | None:
        return ("student and teacher decode jointly, token by token (p̃ = α·p_T + (1−α)·q_θ), and the rollout "
                "worker holds only the student")


def joint_decode(student: torch.nn.Module, teacher: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 max_new_tokens: int, alpha: float, temperature: float, eos_token_id: int | Sequence[int],
                 pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample from α·p_T + (1−α)·q token by token with a KV cache per model.

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts.
        eos_token_id: the id, or ids, that end a row (every one both models declare: ``eos_token_ids``).
    Returns:
        ``(tokens, student_logprobs, mixture_logprobs)``, each ``[B, T]`` with T ≤ max_new_tokens;
        log-probabilities are of the sampled token under q (at ``temperature``) and under the mixture.
    """
    batch_size = prompt_ids.shape[0]
    mask = prompt_mask.clone()
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    caches: list[Any] = [None, None]
    inputs = prompt_ids
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    eos_ids = eos_id_tensor(eos_token_id, prompt_ids.device)
    tokens, student_lps, mix_lps = [], [], []
    synced = dist.needs_synced_decoding(student) or dist.needs_synced_decoding(teacher)
    log_alpha, log_one_minus = math.log(alpha) if alpha > 0 else -math.inf, math.log1p(-alpha) if alpha < 1 else -math.inf
    for _ in range(max_new_tokens):
        logits = []
        for i, model in enumerate((student, teacher)):
            out = model(input_ids=inputs, attention_mask=mask, position_ids=position_ids, past_key_values=caches[i],
                        use_cache=True)
            caches[i] = out.past_key_values
            logits.append(out.logits[:, -1].float())
        vocab = min(x.shape[-1] for x in logits)  # heads padded to different sizes: the shared rows only (trim_vocabulary)
        log_q, log_p = (torch.log_softmax(x[:, :vocab] / temperature, dim=-1) for x in logits)
        log_mix = torch.logsumexp(torch.stack([log_p + log_alpha, log_q + log_one_minus]), dim=0)
        next_token = torch.multinomial(log_mix.exp(), 1).squeeze(1)
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        tokens.append(next_token)
        student_lps.append(log_q.gather(1, next_token[:, None]).squeeze(1))
        mix_lps.append(log_mix.gather(1, next_token[:, None]).squeeze(1))
        finished |= torch.isin(next_token, eos_ids)
        done = bool(finished.all())
        if synced:  # ZeRO-3 forwards are collectives: a rank that is done keeps stepping until every rank is
            done = dist.all_ranks_true(done)
        if done:
            break
        inputs = next_token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return torch.stack(tokens, 1), torch.stack(student_lps, 1), torch.stack(mix_lps, 1)


class AdaptiveReplayPolicy(BehaviourPolicy):
    """DistiLLM's adaptive off-policy schedule with a replay buffer of student outputs (Ko et al. 2024, Sec. 3.2).

    Per micro-batch draw r ~ U(0, 1); with threshold θ and step fraction f:
    ``samp = θ·(1−f)`` ("decreasing", the official default), ``θ·f`` ("increasing") or ``θ/2`` ("constant").
    If r < samp (or r < θ while the buffer is not full) the student generates fresh completions,
    which are pushed to the FIFO buffer; else if r < θ a random buffer batch is replayed; else the
    dataset batch is used. After each evaluation, if the validation loss rose by at least ``loss_eps``
    over the previous evaluation's, θ ← min(θ + 0.1, 1). (The official code compares with the loss
    recorded at the last increase instead; ``opd.methods.distillm`` offers both.)

    Args:
        init_threshold: starting θ (official default 0.0: start off-policy).
        capacity: replay buffer size in sequences.
        loss_eps: validation-loss rise that triggers a threshold increase.
        replay_ratio: "decreasing", "increasing" or "constant".
        threshold_step: how much θ rises per trigger.
    """

    def __init__(self, init_threshold: float = 0.0, capacity: int = 1000, loss_eps: float = 0.1,
                 replay_ratio: str = "decreasing", threshold_step: float = 0.1) -> None:
        if not 0.0 <= init_threshold <= 1.0:
            raise ValueError(f"init_threshold must be in [0, 1], got {init_threshold}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if replay_ratio not in ("decreasing", "increasing", "constant"):
            raise ValueError(f"replay_ratio must be decreasing, increasing or constant, got {replay_ratio!r}")
        self.threshold, self.capacity, self.loss_eps = init_threshold, capacity, loss_eps
        self.replay_ratio, self.threshold_step = replay_ratio, threshold_step
        self.buffer: collections.deque[tuple[Example, list[int]]] = collections.deque(maxlen=capacity)
        self.previous_loss: float | None = None
        self.student, self.dataset = StudentPolicy(), DatasetPolicy()

    def sample_probability(self, fraction: float) -> float:
        if self.replay_ratio == "decreasing":
            return self.threshold * (1 - fraction)
        if self.replay_ratio == "increasing":
            return self.threshold * fraction
        return self.threshold * 0.5

    def collect(self, ctx: RolloutContext, examples: list[Example]) -> RolloutBatch:
        r = ctx.rng.random()
        fresh = r < self.sample_probability(ctx.step / max(ctx.max_steps, 1)) or (
            r < self.threshold and len(self.buffer) < self.capacity)
        if fresh:
            batch = self.student.collect(ctx, examples)
            for example, ids, mask in zip(batch.examples, batch.completion_ids.tolist(), batch.completion_mask.tolist()):
                self.buffer.append((example, [t for t, m in zip(ids, mask) if m]))
            return batch
        if r < self.threshold and self.buffer:
            picked = ctx.rng.sample(list(self.buffer), min(len(examples), len(self.buffer)))
            batch = encode_targets(ctx.tokenizer, [e for e, _ in picked], ctx.device, source="replay",
                                   completion_tokens=[ids for _, ids in picked])
            return batch
        return self.dataset.collect(ctx, examples)

    def async_blocker(self) -> str | None:
        return ("its replay buffer takes each fresh rollout as it is drawn and its schedule moves at evaluations, "
                "so rollouts written ahead would enter the buffer and the schedule out of order")

    def on_evaluate(self, validation_loss: float) -> dict[str, float]:
        if self.previous_loss is not None and validation_loss >= self.previous_loss + self.loss_eps:
            self.threshold = min(self.threshold + self.threshold_step, 1.0)
        self.previous_loss = validation_loss
        return {"distillm/threshold": self.threshold, "distillm/buffer_size": float(len(self.buffer)),
                "distillm/validation_loss": validation_loss}

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "previous_loss": self.previous_loss,
                "buffer": [(dataclasses.asdict(e), ids) for e, ids in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold, self.previous_loss = state["threshold"], state["previous_loss"]
        self.buffer.clear()
        self.buffer.extend((Example(**e), ids) for e, ids in state["buffer"])
