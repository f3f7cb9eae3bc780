"""Teachers that are not a local model: a vLLM server returning sparse log-probabilities (``teacher.backend=vllm_server``)."""

from opd.teachers.base import SparseTeacherLogprobs
from opd.teachers.vllm_server import TeacherServerError, VLLMServerTeacher, launch_server

__all__ = ["SparseTeacherLogprobs", "TeacherServerError", "VLLMServerTeacher", "launch_server"]
