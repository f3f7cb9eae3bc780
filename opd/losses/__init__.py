"""Loss building blocks: divergences, top-k and sampled-token estimators, and the masked reduction."""

from opd.losses.divergences import (
    clipped_forward_kl,
    entropy,
    forward_kl,
    generalized_jsd,
    masked_reduce,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from opd.losses.sampled import discounted_returns, masked_whiten, policy_gradient_loss, sampled_log_ratio
from opd.losses.topk import sparse_topk_forward_kl, topk_forward_kl, topk_reverse_kl

__all__ = ["clipped_forward_kl", "discounted_returns", "entropy", "forward_kl", "generalized_jsd", "masked_reduce",
           "masked_whiten", "policy_gradient_loss", "reverse_kl", "sampled_log_ratio", "skew_forward_kl",
           "skew_reverse_kl", "sparse_topk_forward_kl", "topk_forward_kl", "topk_reverse_kl", "total_variation"]
