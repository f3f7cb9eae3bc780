"""Distillation methods, one module per registry name. Importing this package registers them all."""

import importlib
import pkgutil

from opd.methods.base import LossOutput, Method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LossOutput", "Method"]
