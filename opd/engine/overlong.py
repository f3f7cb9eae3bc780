"""Rollouts the length budget cut: sampled completions that reached ``sampler.max_new_tokens`` before any EOS.

They are DAPO's "overlong" samples (Yu et al. 2025, Sec. 3.4). The trainer counts them every step
(``rollout/truncated``) and over the run (``rollout_truncated`` in the summary). With ``trainer.overlong=mask`` they
get no loss: their completion mask is zeroed, as DAPO's overlong filtering does; a step left with no token at all
changes no weight and is counted in ``train/empty_steps``.
"""

from __future__ import annotations

import dataclasses

from opd import distributed as dist
from opd.sampling.base import unfinished_rows
from opd.types import RolloutBatch

#: the batch sources written by a sampler in this step; dataset and replayed rows are not counted
SAMPLED_SOURCES = ("student", "teacher", "mixed")


@dataclasses.dataclass
class OverlongRollouts:
    """Counts (and, with ``mask``, masks) the step's cut rollouts; its counters are saved in checkpoints.

    Args:
        eos_ids: every id that ends a completion (student's and teacher's, ``opd.sampling.base.eos_token_ids``).
        mask: ``trainer.overlong == "mask"``: cut rows get no loss.
    """

    eos_ids: list[int]
    mask: bool
    sampled: int = 0  # sampled completions trained on so far (student, teacher or mixed writer), all ranks
    truncated: int = 0  # ... of which cut by sampler.max_new_tokens before any EOS
    empty_steps: int = 0  # steps with no completion token left to train on (mask, every row cut)

    def count(self, batches: list[RolloutBatch]) -> tuple[int, int]:
        """(cut rows, sampled rows) of this step's micro-batches over all ranks; with ``mask`` the cut rows' completion
        masks are zeroed in place."""
        truncated = sampled = 0
        for batch in batches:
            if batch.source not in SAMPLED_SOURCES:
                continue
            cut = unfinished_rows(batch, self.eos_ids)
            truncated, sampled = truncated + int(cut.sum()), sampled + len(cut)
            if self.mask and cut.any():
                batch.completion_mask = batch.completion_mask * (~cut).to(batch.completion_mask.dtype)[:, None]
        truncated, sampled = (int(v) for v in dist.all_reduce_sum([truncated, sampled]))
        self.truncated += truncated
        self.sampled += sampled
        return truncated, sampled

    def step_metrics(self, truncated: int, sampled: int) -> dict[str, float]:
        """``rollout/truncated`` (when the step sampled) and, with ``mask``, ``train/empty_steps`` so far."""
        metrics: dict[str, float] = {"rollout/truncated": truncated / sampled} if sampled else {}
        if self.mask:
            metrics["train/empty_steps"] = self.empty_steps
        return metrics

    def summary(self) -> dict[str, float | int | None]:
        """The run's share of cut rollouts (None: none sampled) and, with ``mask``, its empty steps."""
        share = self.truncated / self.sampled if self.sampled else None
        return {"rollout_truncated": share, **({"empty_steps": self.empty_steps} if self.mask else {})}

    def state(self) -> tuple[int, int, int]:
        return self.sampled, self.truncated, self.empty_steps

    def load_state(self, state: tuple[int, int, int]) -> None:
        self.sampled, self.truncated, self.empty_steps = state
