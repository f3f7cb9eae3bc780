"""opd: on-policy distillation of language models, one Hydra-configured loop for every method."""

__version__ = "0.1.0"
