"""Evaluation on a held-out split: greedy accuracy, pass@k of samples, teacher agreement, and the validation loss
(:class:`Evaluator` runs what a run's ``trainer`` config asks for and returns the metrics to log)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from opd import distributed as dist
from opd.config import TrainerConfig
from opd.data.base import Task
from opd.data.metrics import pass_at_k
from opd.data.mixture import merge_per_source, per_source_accuracy
from opd.errors import TrainingError
from opd.losses.chunked import chunked_token_cross_entropy, token_cross_entropy
from opd.models.scoring import completion_hidden_states, completion_logits, trim_vocabulary
from opd.sampling.behaviour import OwnTokensTeacher
from opd.sampling.hf import HFSampler
from opd.sampling.tokenize import encode_targets, left_pad
from opd.types import Example, RolloutBatch


@dataclasses.dataclass
class EvalResult:
    """Accuracy and a few (prompt, completion, correct) samples for inspection."""

    accuracy: float
    num_examples: int
    mean_length: float
    samples: list[tuple[str, str, bool]]
    eos_rate: float = 0.0  # share of completions that ended with EOS within max_new_tokens (the rest were cut)
    score: float = 0.0  # mean of task.score (ROUGE-L for instruction tasks; equals accuracy for exact-match tasks)
    #: accuracy per ``Example.source`` (mixed data, ``data=mixture``; logged as ``eval/accuracy/<source>``); {} otherwise
    by_source: dict[str, float] = dataclasses.field(default_factory=dict)
    #: scored examples per source (to merge ranks' shares: ``opd.data.mixture.merge_per_source``)
    source_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    #: whether each scored example was answered correctly, in the examples' order (paired comparisons of two models on
    #: the same problems; re-scoring a record on more problems: ``scripts/reevaluate_study.py``)
    correct: list[bool] = dataclasses.field(default_factory=list)


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, tokenizer, task: Task, examples: list[Example], batch_size: int = 64,
                      max_new_tokens: int = 64, num_samples: int = 8, desc: str = "eval",
                      progress: bool = True, num_scored: int | None = None,
                      prompt_ids: Callable[[Example], list[int]] | None = None) -> EvalResult:
    """Greedy-decode every example and score the extracted final answer by exact match.

    Decoding (HFSampler) stops at the first EOS id ``model`` declares (``opd.sampling.base.eos_token_ids``); what
    follows is padding, which decoding skips, so nothing after any declared EOS is scored.

    Args:
        model: the causal LM to evaluate.
        examples: the held-out split.
        num_samples: how many (prompt, completion, correct) triples to keep for logging.
        num_scored: only the first ``num_scored`` examples count (the rest pad a rank's share so that all
            ranks decode the same number of batches); all when None.
        prompt_ids: an example's prompt in ``tokenizer``'s tokens, instead of ``tokenizer``'s encoding of
            ``example.prompt`` (a teacher with another tokenizer reads its own rendering: ``HFTeacher.own_prompt``).
    """
    num_scored = len(examples) if num_scored is None else num_scored
    sampler = HFSampler(max_new_tokens=max_new_tokens)
    from opd.sampling.base import eos_token_ids, unfinished_rows

    eos = eos_token_ids(tokenizer, model)
    lengths, samples, score, flags, finished = 0, [], 0.0, [], 0
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc=desc, leave=False, disable=not progress, unit="batch"):
        chunk = examples[start : start + batch_size]
        prompts = None if prompt_ids is None else left_pad([prompt_ids(ex) for ex in chunk], tokenizer.pad_token_id)
        rollout = sampler.generate(model, tokenizer, chunk, greedy=True, prompts=prompts)
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        row_lengths = rollout.completion_mask.sum(dim=1).tolist()
        row_finished = (~unfinished_rows(rollout, eos)).tolist()
        for index, (example, text) in enumerate(zip(chunk, texts)):
            if start + index >= num_scored:
                break
            lengths += row_lengths[index]
            finished += row_finished[index]
            ok = task.is_correct(text, example)
            flags.append(ok)
            score += task.score(text, example)
            if len(samples) < num_samples:
                samples.append((example.prompt, text, ok))
    n = max(num_scored, 1)
    by_source, source_counts = per_source_accuracy(examples[: len(flags)], flags)
    return EvalResult(accuracy=sum(flags) / n, num_examples=num_scored, mean_length=lengths / n, samples=samples,
                      eos_rate=finished / n, score=score / n, by_source=by_source, source_counts=source_counts,
                      correct=flags)


@torch.no_grad()
def evaluate_pass_at_k(model: torch.nn.Module, tokenizer, task: Task, examples: list[Example], sampler,
                       num_samples: int, ks: tuple[int, ...] = (1,), batch_size: int = 64, desc: str = "eval pass@k",
                       progress: bool = True, num_scored: int | None = None) -> dict[str, float]:
    """Sample ``num_samples`` completions per example with ``sampler`` and report pass@k (Chen et al. 2021, Eq. 1).

    pass@1 over n samples is the mean sampled accuracy (OPSD's average@n, EOPD's mean@n). Completions end at the
    first EOS ``model`` declares (both samplers; with ``sampler=vllm``, ``model``'s own engine).

    Args:
        sampler: the rollout sampler (its temperature, top-p and length cap are used).
        num_samples: n, samples per example.
        ks: the k values reported (each <= n).
        num_scored: only the first ``num_scored`` examples count (padding of a rank's share); all when None.
    Returns:
        ``{"pass@1": ..., "pass@<k>": ...}``.
    """
    correct = []
    repeated = [ex for ex in examples for _ in range(num_samples)]
    for start in tqdm(range(0, len(repeated), batch_size), desc=desc, leave=False, disable=not progress, unit="batch"):
        chunk = repeated[start : start + batch_size]
        rollout = sampler.generate(model, tokenizer, chunk, n=1)  # the n samples are the repeated examples
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        correct += [task.is_correct(text, ex) for ex, text in zip(chunk, texts)]
    per_example = [sum(correct[i : i + num_samples]) for i in range(0, len(correct), num_samples)]
    per_example = per_example[: len(examples) if num_scored is None else num_scored]
    return {f"pass@{k}": sum(pass_at_k(num_samples, c, k) for c in per_example) / max(len(per_example), 1)
            for k in sorted(set(ks)) if k <= num_samples}


@torch.no_grad()
def evaluate_teacher_kl(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, examples: list[Example],
                        sampler, vocab_size: int, batch_size: int = 16, desc: str = "eval teacher KL",
                        progress: bool = True) -> dict[str, float]:
    """Teacher agreement: the exact per-token reverse KL between student and teacher on the student's own samples.

    One completion per example is sampled from the student with ``sampler`` (its temperature and length cap, as
    rollouts are), then both models score it and, at every completion position t,
    KL_t = Σ_v q(v | y<t) (log q(v | y<t) − log p(v | y<t)) over the first ``vocab_size`` entries (q: student,
    p: teacher, both at temperature 1) is averaged over all completion tokens (EOS included). This is the
    quantity on-policy distillation with the reverse KL minimises (Agarwal et al. 2024, Eq. 2 with the student's
    own samples; Gu et al. 2024, Eq. 1), measured exactly over the vocabulary rather than by a sampled estimate.

    Returns:
        ``{"teacher_rkl": mean per-token KL (nats), "sampled_eos_rate": share of samples that ended with EOS,
        "sampled_mean_length": mean completion tokens}``.
    """
    from opd.sampling.base import eos_token_ids, unfinished_rows

    total, tokens, finished = 0.0, 0.0, 0
    eos = eos_token_ids(tokenizer, student)
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc=desc, leave=False, disable=not progress, unit="batch"):
        rollout = sampler.generate(student, tokenizer, examples[start : start + batch_size], n=1)
        mask = rollout.completion_mask.float()
        q_logp = torch.log_softmax(trim_vocabulary(completion_logits(student, rollout), vocab_size).float(), dim=-1)
        p_logp = torch.log_softmax(trim_vocabulary(completion_logits(teacher, rollout), vocab_size).float(), dim=-1)
        kl = (q_logp.exp() * (q_logp - p_logp)).sum(dim=-1)  # [B, T]
        total += float((kl * mask).sum())
        tokens += float(mask.sum())
        finished += int((~unfinished_rows(rollout, eos)).sum())
    n = max(len(examples), 1)
    return {"teacher_rkl": total / max(tokens, 1.0), "sampled_eos_rate": finished / n, "sampled_mean_length": tokens / n}


@torch.no_grad()
def evaluate_teacher_agreement_across_tokenizers(student: torch.nn.Module, teacher, tokenizer, examples: list[Example],
                                                 sampler, vocab_size: int, batch_size: int = 16,
                                                 desc: str = "eval teacher agreement", progress: bool = True
                                                 ) -> dict[str, float]:
    """Teacher agreement for a teacher with another tokenizer: the sequence-level reverse KL on the student's samples.

    Per-token distributions over two vocabularies cannot be compared position by position, but both models give the
    same *text* a probability: the student through its tokens, the teacher through its own tokenization of the decoded
    text (``teacher.score(batch, "retokenized")``, its EOS where the student's row ended). The Monte-Carlo estimate
    E_{y~q}[log q(y) − log p_T(y)] of KL(q‖p_T) over whole completions (the sequence-level reverse KL that on-policy
    distillation minimises, Gu et al. 2024, Eq. 1) is reported per UTF-8 byte of the completions' text, a unit that
    belongs to neither tokenizer, and per student token. One sample per example, as :func:`evaluate_teacher_kl`.

    Args:
        teacher: a teacher component (``opd.teachers``) that provides "retokenized".
    Returns:
        ``{"teacher_sequence_rkl_per_byte", "teacher_sequence_rkl_per_token", "sampled_eos_rate",
        "sampled_mean_length"}``.
    """
    from opd.sampling.base import eos_token_ids, unfinished_rows

    total, tokens, text_bytes, finished = 0.0, 0.0, 0, 0
    eos = eos_token_ids(tokenizer, student)
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, disable=not progress, unit="batch"):
        rollout = sampler.generate(student, tokenizer, examples[start : start + batch_size], n=1)
        mask = rollout.completion_mask.bool()
        logits = trim_vocabulary(completion_logits(student, rollout), vocab_size).float()
        student_logp = torch.log_softmax(logits, dim=-1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
        scored = teacher.score(rollout, "retokenized")
        for row in range(rollout.completion_ids.shape[0]):
            ids = scored.token_ids[row]
            teacher_logp = scored.logprobs[row].float().gather(-1, ids.unsqueeze(-1)).sum()
            total += float(student_logp[row][mask[row]].sum() - teacher_logp)
            kept = rollout.completion_ids[row][mask[row]].tolist()
            text_bytes += len(tokenizer.decode(kept, skip_special_tokens=True).encode("utf-8"))
        tokens += float(mask.sum())
        finished += int((~unfinished_rows(rollout, eos)).sum())
    n = max(len(examples), 1)
    return {"teacher_sequence_rkl_per_byte": total / max(text_bytes, 1), "teacher_sequence_rkl_per_token":
            total / max(tokens, 1.0), "sampled_eos_rate": finished / n, "sampled_mean_length": tokens / n}


def merge_eval_results(parts: list[EvalResult]) -> EvalResult:
    """One :class:`EvalResult` from the ranks' shares (example-weighted means; samples of the first ranks).

    ``parts[r]`` is rank r's strided share (:func:`opd.distributed.strided_shard`: examples r, r + W, ...), so example i's
    flag is ``parts[i % W].correct[i // W]``."""
    total = sum(p.num_examples for p in parts)
    correct = [parts[i % len(parts)].correct[i // len(parts)] for i in range(total)]
    n = max(total, 1)
    samples = [sample for p in parts for sample in p.samples][: max(len(parts[0].samples), 1)]
    by_source, source_counts = merge_per_source([(p.by_source, p.source_counts) for p in parts])
    return EvalResult(accuracy=sum(p.accuracy * p.num_examples for p in parts) / n, num_examples=total,
                      mean_length=sum(p.mean_length * p.num_examples for p in parts) / n, samples=samples,
                      eos_rate=sum(p.eos_rate * p.num_examples for p in parts) / n,
                      score=sum(p.score * p.num_examples for p in parts) / n, by_source=by_source,
                      source_counts=source_counts, correct=correct)


class Evaluator:
    """A run's evaluations, over every process (each rank scores a strided share of the examples).

    Args:
        cfg: the trainer config (``eval_batch_size``, ``eval_samples`` / ``eval_pass_k``, ``eval_teacher_kl``,
            ``progress``).
        task: scores completions.
        tokenizer, sampler: decode the models (the sampler's ``max_new_tokens`` is the evaluation budget too).
        eval_examples: the reported split (or the validation split in a tuning run).
        validation_examples: the split :meth:`validation_loss` scores ([] when the method reads none).
        vocab_size: the vocabulary the pair shares; loss_chunk_size: positions per chunk of the hidden-state path (0:
            full logits).
        num_samples: completions kept for inspection per evaluation.
    """

    def __init__(self, cfg: TrainerConfig, task: Task, tokenizer, sampler, eval_examples: list[Example],
                 validation_examples: list[Example], vocab_size: int, loss_chunk_size: int, num_samples: int,
                 device: torch.device) -> None:
        self.cfg, self.task, self.tokenizer, self.sampler = cfg, task, tokenizer, sampler
        self.eval_examples, self.validation_examples = eval_examples, validation_examples
        self.vocab_size, self.loss_chunk_size, self.num_samples, self.device = vocab_size, loss_chunk_size, num_samples, device
        self.last_pass_at_k: dict[str, float] = {}  # the latest sampled evaluation (trainer.eval_samples > 0)
        self.last_teacher_kl: dict[str, float] = {}  # the latest teacher agreement (trainer.eval_teacher_kl)

    @property
    def progress(self) -> bool:
        return self.cfg.progress and dist.is_main()

    def accuracy(self, model: torch.nn.Module, desc: str, examples: list[Example] | None = None,
                 own_tokens: OwnTokensTeacher | None = None) -> EvalResult:
        """Greedy accuracy on the held-out examples (or on ``examples``, e.g. another view of them), merged over ranks;
        ``own_tokens``: a teacher with another tokenizer, which reads its own rendering of each prompt."""
        examples, num_scored = dist.strided_shard(self.eval_examples if examples is None else examples)
        tokenizer, prompt_ids = (self.tokenizer, None) if own_tokens is None else (own_tokens.tokenizer,
                                                                                   own_tokens.prompt_ids)
        result = evaluate_accuracy(model, tokenizer, self.task, examples, batch_size=self.cfg.eval_batch_size,
                                   max_new_tokens=self.sampler.max_new_tokens, num_samples=self.num_samples, desc=desc,
                                   progress=self.progress, num_scored=num_scored, prompt_ids=prompt_ids)
        return merge_eval_results(dist.gather_objects(result)) if dist.world_size() > 1 else result

    @torch.no_grad()
    def validation_loss(self, model: torch.nn.Module) -> float:
        """The model's token-mean cross-entropy on the validation split's reference completions, in eval mode.

        The quantity DistiLLM's official ``finetune.py`` feeds its adaptive schedule: the student's
        language-modelling loss over the whole development split. The split is the task's own dev
        split or one carved from train (:func:`opd.data.base.validation_split`), never ``task.eval``.
        Over N processes each rank scores a strided share and the sums are added.
        """
        if not self.validation_examples:
            raise TrainingError("validation_loss: this run has no validation split (the method reads none)")
        examples, num_scored = dist.strided_shard(self.validation_examples)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0.0
        try:
            for start in range(0, len(examples), self.cfg.eval_batch_size):
                batch = encode_targets(self.tokenizer, examples[start : start + self.cfg.eval_batch_size], self.device)
                rows = torch.arange(start, start + len(batch.examples), device=self.device) < num_scored  # not padding
                mask = batch.completion_mask * rows[:, None]
                total += float((self.token_cross_entropy(model, batch) * mask).sum())
                count += float(mask.sum())
        finally:
            model.train(was_training)
        total, count = dist.all_reduce_sum([total, count])
        return total / max(count, 1.0)

    def token_cross_entropy(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """``[B, T]`` the model's cross-entropy at each completion token (no ``[B, T, V]`` logits on the chunked path)."""
        if not self.loss_chunk_size:
            return token_cross_entropy(trim_vocabulary(completion_logits(model, batch), self.vocab_size),
                                       batch.completion_ids)
        head = completion_hidden_states(model, batch).first_rows(self.vocab_size)
        return chunked_token_cross_entropy(head.hidden, head.weight, head.bias, batch.completion_ids,
                                           self.loss_chunk_size)

    def metrics(self, result: EvalResult, student: torch.nn.Module, teacher) -> dict[str, Any]:
        """The metrics of one evaluation: ``result``'s, plus pass@k of samples and the teacher agreement when the
        config asks for them (``teacher``: its model, or, for a teacher with another tokenizer, the teacher component,
        which scores text in its own tokens)."""
        metrics = {"eval/accuracy": result.accuracy, "eval/mean_length": result.mean_length, "eval/eos_rate": result.eos_rate}
        metrics.update({f"eval/accuracy/{source}": value for source, value in result.by_source.items()})  # data=mixture
        if self.task.score_name != "exact_match":  # e.g. eval/rouge_l for instruction tasks
            metrics[f"eval/{self.task.score_name}"] = result.score
        if self.cfg.eval_samples:  # sampled evaluation: pass@k over n samples per prompt
            examples, num_scored = dist.strided_shard(self.eval_examples)
            pass_k = evaluate_pass_at_k(student, self.tokenizer, self.task, examples, self.sampler,
                                        self.cfg.eval_samples, tuple(self.cfg.eval_pass_k), self.cfg.eval_batch_size,
                                        progress=self.progress, num_scored=num_scored)
            if dist.world_size() > 1:  # example-weighted mean over ranks
                sums = dist.all_reduce_sum([num_scored] + [pass_k[key] * num_scored for key in sorted(pass_k)])
                pass_k = {key: value / max(sums[0], 1) for key, value in zip(sorted(pass_k), sums[1:])}
            metrics.update({f"eval/{key}": value for key, value in pass_k.items()})
            self.last_pass_at_k = pass_k
        if self.cfg.eval_teacher_kl and teacher is not None:
            # one fixed sampling seed for every evaluation, run and seed (common random numbers: arms differ by their
            # weights, not by the draw); training's RNG stream is untouched. A teacher component (not a module) is one
            # with another tokenizer: the sequence-level agreement on text
            across = not isinstance(teacher, torch.nn.Module)
            measure = evaluate_teacher_agreement_across_tokenizers if across else evaluate_teacher_kl
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                agreement = measure(student, teacher, self.tokenizer, self.eval_examples, self.sampler, self.vocab_size,
                                    batch_size=max(1, self.cfg.eval_batch_size // 2), progress=self.progress)
            metrics.update({f"eval/{key}": value for key, value in agreement.items()})
            self.last_teacher_kl = agreement
        return metrics
