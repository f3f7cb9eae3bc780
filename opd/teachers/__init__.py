"""Teacher kinds (``teacher.kind``), one file each; importing the package registers them in ``opd.registry.TEACHERS``.

``hf`` (a local model), ``initial_student`` (the frozen step-0 student, OPSD) and ``vllm_server`` (a ``vllm serve``
teacher giving top-k log-probs). A new kind is one file here (a :class:`Teacher` subclass with a ``Config`` dataclass)
plus one ``conf/teacher/<name>.yaml`` with ``kind: <kind>``. ``router.py`` is not a kind: it routes the rows of a batch
to several named teachers (``teachers:``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from opd.registry import TEACHERS
from opd.teachers import hf, initial_student, vllm_server  # noqa: F401  (register the kinds)
from opd.teachers.base import TEACHER_OUTPUTS, SparseTeacherLogprobs, Teacher
from opd.teachers.vllm_server import TeacherServerError, VLLMServerTeacher

__all__ = ["TEACHER_OUTPUTS", "SparseTeacherLogprobs", "Teacher", "TeacherServerError", "VLLMServerTeacher",
           "build_teacher", "node_schema", "teacher_config"]

#: the kind of a ``teacher`` node without a ``kind`` key (every local-model entry of conf/teacher/)
DEFAULT_KIND = "hf"


def teacher_config(node: DictConfig | dict | None, kind: str | None = None) -> Any:
    """The ``teacher`` node checked against its kind's schema (unknown keys, types, ranges): the kind's ``Config``.

    Args:
        node: the composed ``teacher`` section, or None.
        kind: a kind fixed by the method (OPSD: ``initial_student``): the node is then not read.
    Returns:
        The ``Config`` instance, or None when there is no teacher.
    Raises:
        ConfigError: one line naming the key (``teacher.server_topk``) and the kind's valid keys.
    """
    resolved = _resolve(node, kind)
    return None if resolved is None else resolved[1]


def build_teacher(node: DictConfig | dict | None, kind: str | None = None) -> Teacher | None:
    """The teacher of ``node`` (or of the method's fixed ``kind``), built but not loaded; None when there is none."""
    resolved = _resolve(node, kind)
    return None if resolved is None else TEACHERS.get(resolved[0])(resolved[1])


def node_schema() -> type:
    """The ``teacher`` node as Hydra types it: ``kind`` and every key of every registered kind, each optional (None).

    Only the chosen kind's keys are read (:func:`teacher_config`): keys left None are dropped before its own schema
    checks the rest, so a key set to null explicitly means its kind's default.
    """
    names = ["kind"] + [f.name for kind in TEACHERS for f in dataclasses.fields(TEACHERS.get(kind).Config)]
    fields = [(name, Optional[Any], dataclasses.field(default=None)) for name in dict.fromkeys(names)]
    return dataclasses.make_dataclass("TeacherNode", fields)


def _resolve(node: DictConfig | dict | None, kind: str | None) -> tuple[str, Any] | None:
    if kind is not None:
        return kind, TEACHERS.get(kind).Config()
    if node is None:
        return None
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    node = {key: value for key, value in node.items() if value is not None}  # other kinds' keys (see node_schema)
    chosen = node.pop("kind", DEFAULT_KIND)
    kwargs = TEACHERS.validate({**node, "kind": chosen}, "teacher")
    return chosen, TEACHERS.get(chosen).Config(**kwargs)
