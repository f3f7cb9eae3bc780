"""Teacher kinds (``teacher.kind``), one file each; importing the package registers them in ``opd.registry.TEACHERS``.

``hf`` (a local model), ``vllm_server`` (a ``vllm serve`` teacher giving top-k log-probs), and the student's own
weights as its teacher (self-distillation): ``initial_student`` (its frozen step-0 copy), ``live`` (the current student)
and ``ema`` (a moving average of it). A new kind is one file here (a :class:`Teacher` subclass with a ``Config`` dataclass)
plus one ``conf/teacher/<name>.yaml`` with ``kind: <kind>``. ``router.py`` is not a kind: it routes the rows of a batch
to several named teachers (``teachers:``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from opd.config import DEFAULT_TEACHER_KIND as DEFAULT_KIND
from opd.config import node_schema, resolve_teacher, teacher_config
from opd.registry import TEACHERS
from opd.teachers import ema, hf, initial_student, live, vllm_server  # noqa: F401  (register the kinds)
from opd.teachers.base import TEACHER_OUTPUTS, Teacher
from opd.teachers.vllm_server import TeacherServerError, VLLMServerTeacher
from opd.types import SparseTeacherLogprobs

__all__ = ["DEFAULT_KIND", "TEACHER_OUTPUTS", "SparseTeacherLogprobs", "Teacher", "TeacherServerError", "VLLMServerTeacher",
           "build_teacher", "node_schema", "teacher_config"]

def build_teacher(node: DictConfig | dict | None, kind: str | None = None) -> Teacher | None:
    """The teacher of ``node`` (or of the method's fixed ``kind``), built but not loaded; None when there is none."""
    resolved = resolve_teacher(node, kind)
    return None if resolved is None else TEACHERS.get(resolved[0])(resolved[1])
