"""Who owns the student's optimizer: a plain torch AdamW in one process, or a DeepSpeed ZeRO engine.

The trainer talks to both through the same five calls per optimizer step::

    for each micro-batch:  backend.backward(loss)       # loss already divided by the step's global token count
    grad_norm = backend.step(skip=...)                   # clip, AdamW, lr schedule; the boundary of accumulation

:class:`LocalBackend` is the single-process path (clipping by ``clip_grad_norm_``; a step with a
non-finite loss or gradient norm changes no weight and no optimizer moment).

:class:`DeepSpeedBackend` trains the student through ``deepspeed.initialize`` (ZeRO stage 0-3; the
optimizer is AdamW built from ``trainer.*``, the schedule is ours, gradient accumulation and clipping
are DeepSpeed's) and holds the teacher in an inference-only engine (no optimizer, eval mode, no grad),
ZeRO-3 sharded by default. Loss scale: every rank's micro-batch loss is its token sum divided by the
*global* token count of the step (all ranks, all micro-batches); DeepSpeed averages gradients over
ranks, so the loss is multiplied by the world size and passed with ``scale_wrt_gas=False``. The sum
over ranks and micro-batches is then exactly the single-process loss of the same global batch.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from opd import distributed as dist
from opd.config import DeepSpeedConfig, TrainerConfig
from opd.engine.checkpoint import load_model_weights
from opd.errors import ConfigError
from opd.models.lora import trainable_parameters


class LocalBackend:
    """torch AdamW + LambdaLR over ``student`` in this process."""

    is_deepspeed = False

    def __init__(self, student: torch.nn.Module, cfg: TrainerConfig, lr_lambda, lora=None) -> None:
        self.student, self.cfg, self.lora = student, cfg, lora
        # only what trains gets optimizer state: every parameter of a full student, a LoRA student's adapters
        self.optimizer = torch.optim.AdamW(trainable_parameters(student), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    @property
    def train_model(self) -> torch.nn.Module:
        """The module whose forward builds the training graph."""
        return self.student

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, skip: bool) -> tuple[float, bool]:
        """Clip, update (unless ``skip`` or the gradient norm is not finite), zero grads, advance the schedule.

        Returns:
            ``(gradient norm before clipping, whether the weights were updated)``.
        """
        params = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item() if params else 0.0
        updated = not skip and math.isfinite(grad_norm)
        if updated:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # a skipped step drops its (non-finite) gradients
        with warnings.catch_warnings():  # a skipped first step trips torch's "scheduler before optimizer" check
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()  # the schedule follows the step count, skipped steps included
        return grad_norm, updated

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], checkpoint: Path) -> None:
        """The student's weights (a LoRA student's adapter) from ``checkpoint``, then optimizer and schedule."""
        if self.lora is not None:
            self.lora.load_adapter(checkpoint)
        else:
            load_model_weights(self.student, checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_extra(self, directory: Path) -> None:
        """Nothing beyond ``trainer_state.pt`` (which holds :meth:`state_dict`) and the HF weights."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's weights for ``save_pretrained`` (None: use the module's own)."""
        return None


def import_deepspeed():
    """``deepspeed``, imported with the CPU accelerator when there is no GPU.

    Raises:
        ConfigError: when DeepSpeed is not installed.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-builds ops (on CPU: its shared-memory collectives) into torch's extension cache; one cache
    # per environment, so two environments do not rebuild over each other's build files (`make install` fills it)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("deepspeed=zero2/zero3 needs DeepSpeed: pip install -e '.[deepspeed]' "
                          "(on CPU: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)") from None
    return deepspeed


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """Prompts per rank of a global micro-batch of ``batch_size`` (``trainer.batch_size``) over ``world_size`` ranks.

    Raises:
        ConfigError: when it does not split evenly.
    """
    if batch_size % world_size:
        raise ConfigError(f"trainer.batch_size={batch_size} (prompts per micro-batch over all processes) must be a "
                          f"multiple of the number of processes ({world_size})")
    return batch_size // world_size


def deepspeed_train_config(ds: DeepSpeedConfig, cfg: TrainerConfig, dtype: str, world_size: int) -> dict[str, Any]:
    """The student engine's DeepSpeed config from ``deepspeed.*`` and ``trainer.*``.

    ``trainer.batch_size`` is the global micro-batch (prompts over all ranks), so each rank gets
    ``batch_size / world_size`` and the hyperparameters mean the same on any number of GPUs.
    """
    micro_batch = per_rank_batch_size(cfg.batch_size, world_size)
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": ds.overlap_comm, "contiguous_gradients": True,
                            "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True,  # consolidated HF weights at each checkpoint
                     "stage3_param_persistence_threshold": ds.param_persistence_threshold,
                     "stage3_prefetch_bucket_size": ds.reduce_bucket_size})
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": 1e-8, "weight_decay": cfg.weight_decay,
            "torch_adam": ds.torch_adam and not ds.offload_optimizer}},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)


def deepspeed_inference_config(ds: DeepSpeedConfig, dtype: str) -> dict[str, Any]:
    """The teacher engine's config: ZeRO-``teacher_stage`` parameter sharding, no optimizer."""
    zero: dict[str, Any] = {"stage": ds.teacher_stage}
    if ds.teacher_stage == 3:
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
        if ds.teacher_offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": dtype == "bfloat16"},
            "fp16": {"enabled": dtype == "float16"}, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


class DeepSpeedBackend:
    """The student in a DeepSpeed ZeRO training engine, the teacher in a ZeRO inference engine.

    Args:
        student: the HF student (moved to this rank's device); it stays reachable as ``self.student``
            (generation, evaluation), while training forwards go through the engine.
        teacher: the frozen teacher, or None; sharded in place when ``teacher_stage`` is 3.
        ds: the ``deepspeed`` config section; cfg: ``trainer``; lr_lambda: the schedule's multiplier.
        dtype, teacher_dtype: the models' ``dtype`` settings (bf16 / fp16 engines follow them).
    """

    is_deepspeed = True

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, ds: DeepSpeedConfig,
                 cfg: TrainerConfig, lr_lambda, dtype: str = "float32", teacher_dtype: str = "float32") -> None:
        deepspeed = import_deepspeed()
        self.ds, self.cfg = ds, cfg
        self.config = deepspeed_train_config(ds, cfg, dtype, dist.world_size())
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=student, model_parameters=[p for p in student.parameters() if p.requires_grad], config=self.config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda))
        self.student = self.engine.module
        self.teacher_engine = None
        if teacher is not None and ds.teacher_stage == 3:
            self.teacher_engine, *_ = deepspeed.initialize(model=teacher,
                                                           config=deepspeed_inference_config(ds, teacher_dtype))
            self.teacher_engine.eval()
        self.world = dist.world_size()

    @property
    def train_model(self) -> torch.nn.Module:
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; DeepSpeed reduces gradients at the accumulation boundary."""
        self.engine.backward(loss * self.world, scale_wrt_gas=False)  # undo DeepSpeed's mean over ranks
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # a micro-step: DeepSpeed only counts it

    def step(self, skip: bool) -> tuple[float, bool]:
        """The boundary step: reduce, clip, AdamW, schedule (all by DeepSpeed).

        ``skip`` (a non-finite loss on some rank; its backward was replaced by a zero loss) runs the
        step at learning rate 0, so the weights stay as they were (AdamW's moments still decay: the
        update itself belongs to DeepSpeed).
        """
        saved, epoch = [group["lr"] for group in self.optimizer.param_groups], self.scheduler.last_epoch
        if skip:
            for group in self.optimizer.param_groups:
                group["lr"] = 0.0
        self.engine.step()  # steps our schedule too, which sets the next lr, unless DeepSpeed skipped it (fp16 overflow)
        if skip and self.scheduler.last_epoch == epoch:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        return grad_norm, not skip

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and schedule live in the DeepSpeed checkpoint (``deepspeed/``) instead."""
        return {}

    def load_state_dict(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Weights, ZeRO optimizer partitions and schedule from ``<checkpoint>/deepspeed``."""
        path, _ = self.engine.load_checkpoint(str(Path(checkpoint) / "deepspeed"), tag="zero",
                                              load_module_strict=False)
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint in {Path(checkpoint) / 'deepspeed'}")

    def save_extra(self, directory: Path) -> None:
        """Every rank writes its ZeRO partitions under ``<directory>/deepspeed/zero`` (collective)."""
        self.engine.save_checkpoint(str(Path(directory) / "deepspeed"), tag="zero")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The consolidated student weights on rank 0 (collective under ZeRO-3; None on other ranks)."""
        if self.ds.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return {name: tensor.detach().cpu() for name, tensor in self.student.state_dict().items()} if dist.is_main() else None

    def local_weights_finite(self) -> bool:
        """Whether this rank's share of the student weights is finite."""
        for param in self.student.parameters():
            data = param.ds_tensor if hasattr(param, "ds_tensor") else param.data
            if data.numel() and not torch.isfinite(data).all():
                return False
        return True


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in recursively (``deepspeed.extra``: any DeepSpeed config key)."""
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
