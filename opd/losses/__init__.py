"""Loss building blocks: divergences between teacher and student and the masked reduction."""

from opd.losses.divergences import forward_kl, generalized_jsd, masked_reduce, reverse_kl

__all__ = ["forward_kl", "generalized_jsd", "masked_reduce", "reverse_kl"]
