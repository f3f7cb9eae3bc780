"""Loss building blocks: divergences between teacher and student and the masked reduction."""

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

__all__ = ["clipped_forward_kl", "entropy", "forward_kl", "generalized_jsd", "masked_reduce", "reverse_kl",
           "skew_forward_kl", "skew_reverse_kl", "total_variation"]
