"""SDFT's and SDPO's self-distillation terms, opd against TRL 1.16's ``loss_utils`` on the same logits, tokens and masks.

For every mode (the student's top-k renormalised or with a tail bucket, full logits, the sampled token), every α that
mode allows (0, 0.5, 1), with and without the importance-sampling clip, and for both TRL modules
(``trl/experimental/sdft/loss_utils.py`` and ``sdpo/loss_utils.py``), it compares opd's per-token term
(:func:`opd.methods.sdft.self_distillation_terms`, the code path of ``method=sdft`` and ``method=sdpo``) and its gradient
with respect to the student's logits against TRL's, on the completion tokens of a ragged batch. Both sides divide the
logits by the sampling temperature (TRL's ``_forward_logits``). It prints the largest relative gap of each case and
exits 1 when one exceeds ``--rtol`` (1e-6) in float64. With the clip, opd computes the importance ratio in float32 (the
convention of every importance ratio in opd, :func:`opd.methods.common.policy_logprobs`), so those cases get the ratio's
rounding on top: 2·eps32·max|log q(y)| (|log q| reaches ~30 here, an allowance of ~7e-6). The same cases in float32 are
printed for information: there the two codes round differently (a tail bucket is 1 − Σ top-k, a cancellation), which
moves the 6th digit.

Usage (``make self-distillation-parity``)::

    .venv/bin/python scripts/self_distillation_parity.py --trl-venv .venv-trl
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_site_packages  # noqa: E402

from opd.methods.sdft import self_distillation_terms  # noqa: E402
from opd.types import Example, RolloutBatch  # noqa: E402

BATCH, LENGTH, VOCAB, TOP_K = 4, 7, 64, 8
TEMPERATURE = 0.7  # not 1, so that a missing or double temperature division shows
IS_CLIP = 2.0


def make_batch(seed: int, dtype: torch.dtype) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor]:
    """A ragged batch (completions of 7, 5, 3 and 1 tokens), student and teacher logits ``[B, T, V]``, and behaviour
    log-probs off the student's by up to ±1.5 nats (so that the clip at 2 binds on some tokens)."""
    generator = torch.Generator().manual_seed(seed)
    completion_ids = torch.randint(VOCAB, (BATCH, LENGTH), generator=generator)
    lengths = torch.tensor([7, 5, 3, 1])
    completion_mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    student = 3.0 * torch.randn(BATCH, LENGTH, VOCAB, generator=generator, dtype=dtype)
    teacher = student + 2.0 * torch.randn(BATCH, LENGTH, VOCAB, generator=generator, dtype=dtype)
    logq = torch.log_softmax(student / TEMPERATURE, dim=-1).gather(-1, completion_ids[..., None]).squeeze(-1)
    behaviour = logq + 3.0 * (torch.rand(BATCH, LENGTH, generator=generator, dtype=dtype) - 0.5)
    batch = RolloutBatch(torch.zeros(BATCH, 1, dtype=torch.long), torch.ones(BATCH, 1, dtype=torch.long), completion_ids,
                         completion_mask, [Example("p", "t", "a")] * BATCH, "student", temperature=TEMPERATURE)
    batch.sampler_logprobs = behaviour
    return batch, student, teacher


def opd_term(batch: RolloutBatch, student: torch.Tensor, teacher: torch.Tensor, mode: str, alpha: float, tail: bool,
             clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """opd's per-token term ``[B, T]`` and d(masked sum)/d student logits."""
    method = types.SimpleNamespace(mode=mode, top_k=TOP_K, tail=tail, alpha=alpha, is_clip=clip)
    leaf = student.clone().requires_grad_(True)
    per_token, _ = self_distillation_terms(method, batch, leaf, teacher)
    (grad,) = torch.autograd.grad((per_token * batch.completion_mask).sum(), leaf)
    return per_token.detach(), grad


def trl_term(loss_utils, batch: RolloutBatch, student: torch.Tensor, teacher: torch.Tensor, mode: str, alpha: float,
             tail: bool, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's per-token term and gradient, as ``SDFTTrainer._compute_self_distillation_loss`` computes it."""
    from trl.trainer.utils import selective_log_softmax

    leaf = student.clone().requires_grad_(True)
    student_logits, teacher_logits = leaf / TEMPERATURE, teacher / TEMPERATURE
    if mode == "topk_logits":
        per_token = loss_utils.compute_topk_self_distillation_loss(
            student_logits, teacher_logits, distillation_topk=TOP_K, distillation_alpha=alpha, distillation_add_tail=tail)
    elif mode == "full_logits":
        per_token = loss_utils.compute_full_logit_self_distillation_loss(student_logits, teacher_logits,
                                                                         distillation_alpha=alpha)
    else:
        per_token = loss_utils.compute_sampled_token_self_distillation_loss(
            student_logits, teacher_logits, batch.completion_ids, distillation_alpha=alpha)
    if clip is not None:
        per_token = loss_utils.apply_importance_sampling_clipping(
            per_token, selective_log_softmax(student_logits, batch.completion_ids), batch.sampler_logprobs, clip)
    (grad,) = torch.autograd.grad((per_token * batch.completion_mask).sum(), leaf)
    return per_token.detach(), grad


def relative_gap(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |ours − theirs| / max |theirs| over the masked positions (all when ``mask`` is None)."""
    if mask is not None:
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))


def cases() -> list[tuple[str, float, bool]]:
    """(mode, α, tail) of every case TRL's functions accept."""
    out = []
    for alpha in (0.0, 0.5, 1.0):
        out += [("topk_logits", alpha, False), ("topk_logits", alpha, True), ("full_logits", alpha, False)]
    return out + [("sampled_token", 1.0, False)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-venv", type=Path, default=ROOT / ".venv-trl", help="the venv of `make bench-trl`")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rtol", type=float, default=1e-6)
    args = parser.parse_args()
    if add_site_packages(args.trl_venv) is None:
        sys.exit(f"no site-packages under {args.trl_venv}: run `make bench-trl` first")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.sdft import loss_utils as sdft_utils
    from trl.experimental.sdpo import loss_utils as sdpo_utils

    eps32 = torch.finfo(torch.float32).eps
    failures, worst_term = 0, 0.0
    print(f"{'module':<6} {'mode':<14} {'alpha':>5} {'tail':<5} {'clip':<5} {'float64 value':>13} {'grad':>8} "
          f"{'allowed':>8} {'float32 value':>13} {'grad':>8}")
    for module_name, loss_utils in (("sdft", sdft_utils), ("sdpo", sdpo_utils)):
        for mode, alpha, tail in cases():
            for clip in (None, IS_CLIP):
                gaps = {dtype: [0.0, 0.0] for dtype in (torch.float64, torch.float32)}
                allowed = args.rtol
                for dtype in gaps:
                    for seed in args.seeds:
                        batch, student, teacher = make_batch(seed, dtype)
                        ours, our_grad = opd_term(batch, student, teacher, mode, alpha, tail, clip)
                        theirs, their_grad = trl_term(loss_utils, batch, student, teacher, mode, alpha, tail, clip)
                        gaps[dtype][0] = max(gaps[dtype][0], relative_gap(ours, theirs, batch.completion_mask))
                        gaps[dtype][1] = max(gaps[dtype][1], relative_gap(our_grad, their_grad))
                        if clip is not None and dtype == torch.float64:
                            allowed = max(allowed, args.rtol + 2 * eps32 * float(batch.sampler_logprobs.abs().max()))
                (v64, g64), (v32, g32) = gaps[torch.float64], gaps[torch.float32]
                failures += max(v64, g64) > allowed
                worst_term = max(worst_term, v64, g64) if clip is None else worst_term
                print(f"{module_name:<6} {mode:<14} {alpha:>5} {str(tail):<5} {str(clip):<5} {v64:>13.1e} {g64:>8.1e} "
                      f"{allowed:>8.1e} {v32:>13.1e} {g32:>8.1e}")
    print(f"float64: largest relative gap without the clip {worst_term:.1e} (tolerance {args.rtol:.0e}); "
          f"{failures} case(s) over their tolerance: {'PASS' if failures == 0 else 'FAIL'}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
