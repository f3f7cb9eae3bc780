"""Greedy exact-match evaluation on a held-out split."""

from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from opd.data.base import Task
from opd.data.metrics import pass_at_k
from opd.data.mixture import per_source_accuracy
from opd.sampling.hf import HFSampler
from opd.types import Example


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


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, tokenizer, task: Task, examples: list[Example], batch_size: int = 64,
                      max_new_tokens: int = 64, num_samples: int = 8, desc: str = "eval",
                      progress: bool = True, num_scored: int | None = None) -> EvalResult:
    """Greedy-decode every example and score the extracted final answer by exact match.

    Decoding (HFSampler) stops at the first EOS id ``model`` declares (``opd.sampling.base.eos_token_ids``); what
    follows is padding, which decoding skips, so nothing after any declared EOS is scored.

    Args:
        model: the causal LM to evaluate.
        examples: the held-out split.
        num_samples: how many (prompt, completion, correct) triples to keep for logging.
        num_scored: only the first ``num_scored`` examples count (the rest pad a rank's share so that all
            ranks decode the same number of batches); all when None.
    """
    num_scored = len(examples) if num_scored is None else num_scored
    sampler = HFSampler(max_new_tokens=max_new_tokens)
    from opd.sampling.base import eos_token_ids, unfinished_rows

    eos = eos_token_ids(tokenizer, model)
    correct, lengths, samples, score, flags, finished = 0, 0, [], 0.0, [], 0
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc=desc, leave=False, disable=not progress, unit="batch"):
        chunk = examples[start : start + batch_size]
        rollout = sampler.generate(model, tokenizer, chunk, greedy=True)
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        row_lengths = rollout.completion_mask.sum(dim=1).tolist()
        row_finished = (~unfinished_rows(rollout, eos)).tolist()
        for index, (example, text) in enumerate(zip(chunk, texts)):
            if start + index >= num_scored:
                break
            lengths += row_lengths[index]
            finished += row_finished[index]
            ok = task.is_correct(text, example)
            correct += ok
            flags.append(ok)
            score += task.score(text, example)
            if len(samples) < num_samples:
                samples.append((example.prompt, text, ok))
    n = max(num_scored, 1)
    by_source, source_counts = per_source_accuracy(examples[: len(flags)], flags)
    return EvalResult(accuracy=correct / n, num_examples=num_scored, mean_length=lengths / n, samples=samples,
                      eos_rate=finished / n, score=score / n, by_source=by_source, source_counts=source_counts)


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
    from opd.models.scoring import completion_logits, trim_vocabulary
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
