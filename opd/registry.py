"""Registries: one place that maps config names to the classes that implement them.

Every pluggable component (methods, samplers, datasets) registers itself with a decorator::

    @METHODS.register("gkd")
    class GKD(Method): ...

and is built from its config node with ``METHODS.build(cfg.method)``: the node's ``name`` picks the
class, the remaining keys are checked against the class's ``__init__`` signature (name *and* type),
so a misspelled or ill-typed key fails at start-up with a message that names it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opd.errors import ConfigError, unknown_key_error

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> class mapping with signature-checked construction.

    Args:
        kind: what the registry holds ("method", "sampler", ...), used in messages and as the
            config group name.
        name_key: the config key that picks the entry (``name``; teachers: ``kind``).
    """

    def __init__(self, kind: str, name_key: str = "name") -> None:
        self.kind, self.name_key = kind, name_key
        self._entries: dict[str, type[T] | str] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator adding ``cls`` under ``name``; a second class with the same name raises."""

        def decorator(cls: type[T]) -> type[T]:
            existing = self._entries.get(name)
            if existing is not None and existing is not cls and not isinstance(existing, str):
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
            self._entries[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"package.module:Class"`` without importing it (for heavy optional extras)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; unknown names list the known ones."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise ConfigError(f"{self.kind}: unknown name {name!r}; known {self.kind}s: {known}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            try:
                entry = getattr(importlib.import_module(module), attr)
            except ImportError as err:
                raise ConfigError(f"{self.kind} {name!r} needs an optional dependency that is not installed ({err}). "
                                  f"Install the matching extra, e.g. `pip install -e .[{name}]`.") from err
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """(name, first docstring line) for every entry, for ``make methods`` and ``--help``."""
        rows = []
        for name in self:
            entry = self._entries[name]
            if isinstance(entry, str) and name in OPTIONAL.get(self, set()):  # an optional extra may be missing
                rows.append((name, f"(optional extra, loaded on use from {entry.split(':')[0]})"))
                continue
            entry = self.get(name)
            doc = (inspect.getdoc(entry) or "").strip().splitlines()
            rows.append((name, doc[0] if doc else ""))
        return rows

    def schema(self, name: str) -> type:
        """A dataclass whose fields mirror ``cls.__init__``'s keyword arguments (types and defaults), or, for a class
        that declares its keys as a ``Config`` dataclass (teacher kinds), that dataclass's fields."""
        cls = self.get(name)
        config = getattr(cls, "Config", None)
        if dataclasses.is_dataclass(config):
            return dataclasses.make_dataclass(f"{cls.__name__}Config",
                                              [(self.name_key, str, dataclasses.field(default=name))], bases=(config,))
        hints = typing.get_type_hints(cls.__init__)
        fields: list[tuple[str, Any, Any]] = [(self.name_key, str, dataclasses.field(default=name))]
        for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            default = dataclasses.MISSING if param.default is param.empty else param.default
            annotation = hints.get(param.name, Any)
            if isinstance(default, (list, dict)):
                fields.append((param.name, annotation, dataclasses.field(default_factory=lambda d=default: type(d)(d))))
            else:
                fields.append((param.name, annotation, dataclasses.field(default=default)))
        return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)

    def check_keys(self, name: str, keys: list[str], section: str | None = None, schema: type | None = None) -> list[str]:
        """Refuse the first of ``keys`` that the schema of entry ``name`` lacks; return the schema's keys.

        Shared by :meth:`validate` and the command line's check (``opd.config.check_cli_overrides``), so both give the
        same line. ``schema``: ``self.schema(name)`` when the caller has already built it.

        Raises:
            ConfigError: ``unknown config key 'method.betaa' (did you mean 'method.beta'?); valid keys of method 'gkd':
                ...``.
        """
        section = section or self.kind
        fields = [f.name for f in dataclasses.fields(schema or self.schema(name))]
        unknown = [str(k) for k in keys if k not in fields]
        if unknown:
            raise unknown_key_error(f"{section}.{unknown[0]}", fields, section, owner=f"{self.kind} {name!r}")
        return fields

    def validate(self, node: DictConfig | dict, key: str | None = None) -> dict[str, Any]:
        """Check ``node`` against the schema of ``node.name``; return the constructor kwargs.

        Raises:
            ConfigError: naming the offending key (``method.betta``) for unknown keys (with the valid ones), wrong
                types and missing required values.
        """
        key = key or self.kind
        if node is None or self.name_key not in node:
            raise ConfigError(f"{key}: missing `{self.name_key}`; choose one of: {', '.join(self)}")
        name = node[self.name_key]
        schema_class = self.schema(name)
        fields = self.check_keys(name, list(node), key, schema_class)
        schema = OmegaConf.structured(schema_class)
        try:
            merged = OmegaConf.merge(schema, node)
            kwargs = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as err:
            full_key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
            msg = str(err).splitlines()[0]
            raise ConfigError(f"{key}.{full_key}: {msg} (valid keys for {self.kind} {name!r}: {', '.join(fields)})") from None
        kwargs.pop(self.name_key)
        return kwargs

    def build(self, node: DictConfig | dict, key: str | None = None, **extra: Any) -> T:
        """Validate ``node`` and construct the registered class with its kwargs plus ``extra``."""
        kwargs = self.validate(node, key)
        cls = self.get(node[self.name_key])
        try:
            return cls(**kwargs, **extra)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{key or self.kind} ({node[self.name_key]}): {err}") from None


METHODS: Registry = Registry("method")
SAMPLERS: Registry = Registry("sampler")
DATASETS: Registry = Registry("data")
#: teacher kinds (``teacher.kind``): ``opd/teachers/<kind>.py``
TEACHERS: Registry = Registry("teacher", name_key="kind")

#: the built-in components, declared: registry -> {config name: "module:Class"}. Each is imported on first use
#: (:meth:`Registry.get`), so that the registry, and the config layer that finds schemas through it, import no
#: implementation; importing an implementation module registers its class under the same name (the decorator
#: replaces the declared entry). ``tests/test_layers.py`` checks that this table and the decorators agree.
BUILTINS: dict[Registry, dict[str, str]] = {
    METHODS: {
        "alm": "opd.methods.alm:ALM", "aopd": "opd.methods.aopd:AOPD", "distillm": "opd.methods.distillm:DistiLLM",
        "distillm2": "opd.methods.distillm2:DistiLLM2", "eopd": "opd.methods.eopd:EOPD", "gkd": "opd.methods.gkd:GKD",
        "kd": "opd.methods.kd:KD", "minillm": "opd.methods.minillm:MiniLLM", "opsd": "opd.methods.opsd:OPSD",
        "reopold": "opd.methods.reopold:REOPOLD", "sdft": "opd.methods.sdft:SDFT", "sdpo": "opd.methods.sdpo:SDPO",
        "seqkd": "opd.methods.seqkd:SeqKD",
        "rs_seqkd": "opd.methods.seqkd:RejectionSampledSeqKD", "sft": "opd.methods.sft:SFT", "tip": "opd.methods.tip:TIP",
        "tm_opd": "opd.methods.tm_opd:TMOPD", "topk_rkl_sg": "opd.methods.topk_rkl_sg:TopKRKLStopGrad",
        "uld": "opd.methods.uld:ULD",
    },
    SAMPLERS: {"hf": "opd.sampling.hf:HFSampler", "vllm": "opd.sampling.vllm:VLLMSampler",
               "auto": "opd.sampling.auto:AutoSampler"},
    DATASETS: {
        "arithmetic": "opd.data.arithmetic:ChainArithmetic", "gym": "opd.data.gym:GymTask", "gsm8k": "opd.data.hub:GSM8K",
        "instruct": "opd.data.instruct:InstructTask", "jsonl": "opd.data.jsonl:JsonlTask", "math": "opd.data.math:MathTask",
        "mixture": "opd.data.mixture:Mixture", "multiplication": "opd.data.multiplication:Multiplication",
    },
    TEACHERS: {
        "hf": "opd.teachers.hf:HFTeacher", "initial_student": "opd.teachers.initial_student:InitialStudentTeacher",
        "live": "opd.teachers.live:LiveStudentTeacher", "ema": "opd.teachers.ema:EMATeacher",
        "vllm_server": "opd.teachers.vllm_server:ServedTeacher",
    },
}
#: declared entries whose module needs an optional extra: listed without importing them (``make methods``)
OPTIONAL: dict[Registry, set[str]] = {SAMPLERS: {"vllm"}}
for _registry, _entries in BUILTINS.items():
    for _name, _target in _entries.items():
        _registry.register_lazy(_name, _target)


def load_builtin_components() -> None:
    """Import every declared built-in that needs no optional extra (their docstrings, ``Config`` schemas and
    class attributes become readable); the registries already know every name without this."""
    for registry, entries in BUILTINS.items():
        for name in entries:
            if name not in OPTIONAL.get(registry, set()):
                registry.get(name)
