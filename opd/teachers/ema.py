"""``teacher.kind: ema``: an exponential moving average of the student (SDPO's default self-teacher)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from opd.registry import TEACHERS
from opd.teachers.base import Teacher


@dataclasses.dataclass
class EMAConfig:
    """Keys of ``teacher.*`` for ``kind: ema`` (TRL 1.16 ``teacher_update_rate`` and ``teacher_sync_steps``).

    Attributes:
        update_rate: α in (0, 1]: after a sync the teacher is (1 − α)·θ_T + α·θ_S (1 = a copy of the student).
        sync_every: sync after every this many optimizer steps (>= 1).
    """

    update_rate: float = 0.05
    sync_every: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.update_rate <= 1.0:
            raise ValueError(f"teacher.update_rate must be in (0, 1], got {self.update_rate}")
        if self.sync_every < 1:
            raise ValueError(f"teacher.sync_every must be >= 1, got {self.sync_every}")


@TEACHERS.register("ema")
class EMATeacher(Teacher):
    """A frozen copy of the student that follows it: θ_T ← (1 − α)·θ_T + α·θ_S after every ``sync_every``-th optimizer
    step (Polyak averaging; SDPO, Hübotter et al., arXiv:2601.20802, and TRL's ``SyncTeacherModelCallback``).

    It starts as the student at step 0. Only the student's trainable tensors are averaged (a LoRA student's adapters;
    its frozen base is the same in both), and only they go into checkpoints, so a resumed run continues with the
    teacher it had. Under DeepSpeed ZeRO-2 every process holds the whole student and updates its own identical copy;
    ZeRO-3, whose processes hold only partitions, is refused at start-up.
    """

    Config = EMAConfig
    provides = frozenset({"logits", "hidden"})
    averages_student = True

    def setup(self, student: torch.nn.Module, tokenizer, device: torch.device) -> int:
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        own = dict(self.model.named_parameters())
        #: (the student's trainable parameter, the teacher's copy of it)
        self.pairs = [(name, param, own[name]) for name, param in student.named_parameters() if param.requires_grad]
        self.vocab_size = student.get_output_embeddings().weight.shape[0]
        return self.vocab_size

    @torch.no_grad()
    def after_update(self, student: torch.nn.Module, steps_done: int) -> None:
        if steps_done % self.cfg.sync_every == 0:
            for _, source, target in self.pairs:
                target.lerp_(source.detach().to(target.dtype), self.cfg.update_rate)

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": {name: target.detach().cpu().clone() for name, _, target in self.pairs}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        averaged = state.get("averaged")
        if averaged is None:
            raise ValueError("the checkpoint holds no EMA teacher (it was written by a run with another teacher)")
        missing = [name for name, _, _ in self.pairs if name not in averaged]
        if missing:
            raise ValueError(f"the checkpoint's EMA teacher lacks {len(missing)} tensors, e.g. {missing[0]!r}")
        with torch.no_grad():
            for name, _, target in self.pairs:
                target.copy_(averaged[name])
