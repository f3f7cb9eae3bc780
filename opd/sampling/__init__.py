"""Behaviour policies that write rollouts. ``hf`` is built in; ``vllm`` is an optional extra (declared in
``opd.registry.BUILTINS``, imported on first use)."""

from opd.sampling import hf  # noqa: F401  (registration)
from opd.sampling.base import Sampler
from opd.types import RolloutBatch

__all__ = ["RolloutBatch", "Sampler"]
