"""Behaviour policies that write rollouts. ``hf`` is built in; ``vllm`` is an optional extra, imported lazily."""

from opd.registry import SAMPLERS
from opd.sampling import hf  # noqa: F401  (registration)
from opd.sampling.base import RolloutBatch, Sampler

SAMPLERS.register_lazy("vllm", "opd.sampling.vllm:VLLMSampler")

__all__ = ["RolloutBatch", "Sampler"]
