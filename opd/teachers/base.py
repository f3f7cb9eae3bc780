"""What a teacher that is not a local model returns: sparse log-probabilities at the completion positions."""

from __future__ import annotations

import dataclasses
import math

import torch

from opd.sampling.base import RolloutBatch


@dataclasses.dataclass
class SparseTeacherLogprobs:
    """The teacher's next-token log-probabilities at a RolloutBatch's completion positions, top-k only.

    Position ``t`` is the teacher's distribution over ``completion_ids[:, t]`` given everything before
    it, as in :func:`opd.engine.scoring.completion_logits`. Log-probabilities are at temperature 1
    (a vLLM server's prompt log-probs are the log-softmax of the raw logits whatever the request's
    temperature).

    Padding (positions where ``completion_mask`` is 0 and that were not scored) holds finite
    placeholders, so that losses stay finite before masking: ``topk_ids`` = 0, 1, ..., k−1 with
    ``topk_logprobs`` = −log k each (a valid uniform distribution), and ``token_logprobs`` = 0 (like
    ``RolloutBatch.sampler_logprobs``). Losses must mask them with ``completion_mask``.

    Attributes:
        topk_ids: ``[B, T, k]`` long, the teacher's k most likely tokens, most likely first.
        topk_logprobs: ``[B, T, k]`` float32, their log-probabilities (descending; ``-inf`` allowed).
        token_logprobs: ``[B, T]`` float32, log p_T(completion_ids[:, t]), exact even when the token is
            not among the top-k.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    token_logprobs: torch.Tensor

    def __post_init__(self) -> None:
        if self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[:-1] != self.token_logprobs.shape:
            raise ValueError(f"SparseTeacherLogprobs: topk_ids {tuple(self.topk_ids.shape)}, topk_logprobs "
                             f"{tuple(self.topk_logprobs.shape)} and token_logprobs {tuple(self.token_logprobs.shape)} "
                             "must be [B, T, k], [B, T, k] and [B, T]")

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    def truncate(self, k: int) -> SparseTeacherLogprobs:
        """The first ``k`` entries (the teacher's top-k, since entries are sorted by descending log-prob)."""
        if not 0 <= k <= self.k:
            raise ValueError(f"cannot truncate a top-{self.k} teacher output to k = {k}")
        return dataclasses.replace(self, topk_ids=self.topk_ids[..., :k], topk_logprobs=self.topk_logprobs[..., :k])

    def to(self, device: torch.device | str) -> SparseTeacherLogprobs:
        return SparseTeacherLogprobs(self.topk_ids.to(device), self.topk_logprobs.to(device), self.token_logprobs.to(device))

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, batch: RolloutBatch, k: int) -> SparseTeacherLogprobs:
        """What a server would return for ``batch``, from local full logits (tests, and a sparse local path).

        Args:
            teacher_logits: ``[B, T, V]`` teacher logits at the completion positions.
            batch: the rollouts (padding placeholders where ``completion_mask`` is 0).
            k: entries kept per position, 0 <= k <= V.
        """
        logp = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
        top = logp.topk(k, dim=-1)
        token = logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        pad = padding_like(batch.completion_ids, k)
        real = batch.completion_mask.bool()
        return cls(torch.where(real[..., None], top.indices, pad.topk_ids),
                   torch.where(real[..., None], top.values, pad.topk_logprobs),
                   torch.where(real, token, pad.token_logprobs))


def padding_like(completion_ids: torch.Tensor, k: int) -> SparseTeacherLogprobs:
    """``[B, T]``-shaped placeholders (see :class:`SparseTeacherLogprobs`) to be overwritten at scored positions."""
    b, t = completion_ids.shape
    ids = torch.arange(k, dtype=torch.long, device=completion_ids.device).expand(b, t, k).clone()
    lps = torch.full((b, t, k), -math.log(k) if k else 0.0, dtype=torch.float32, device=completion_ids.device)
    return SparseTeacherLogprobs(ids, lps, torch.zeros((b, t), dtype=torch.float32, device=completion_ids.device))
