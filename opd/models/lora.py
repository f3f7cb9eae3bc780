"""LoRA students (``student.lora.r``): low-rank adapters trained on-policy, the base weights frozen.

LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3): a targeted linear layer computes ``W0 x + (alpha / r) B A x`` with
``A`` ``[r, in]`` and ``B`` ``[out, r]`` trained and ``W0`` frozen; ``B`` starts at zero (PEFT's default), so a LoRA
student computes exactly the base model's function until its first update.

The adapters come from the ``peft`` library, injected *in place* into the Hugging Face model
(:func:`apply_lora` keeps the ``PeftModel`` that wraps it as :class:`LoraStudent`): the trainer, the scoring
functions, the evaluator, DeepSpeed and the samplers keep working on the same ``AutoModelForCausalLM`` object, whose
targeted ``Linear`` layers now hold ``base_layer`` + ``lora_A``/``lora_B``. What changes with adapters:

- only adapter parameters require gradients, so only they get optimizer state (:func:`trainable_parameters`);
- checkpoints hold the adapter in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``; loadable
  with ``PeftModel.from_pretrained``), never the frozen base (:meth:`LoraStudent.save_adapter`);
- a rollout worker or a vLLM engine gets the adapter only (:func:`adapter_tensors`), or the merged weights under
  the base model's own names (:func:`merged_named_tensors`);
- a teacher that is the student's initial weights runs the same model with its adapters off
  (:class:`AdaptersOff`): no second copy in memory.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from opd.config import LoraConfig
from opd.errors import ConfigError, ModelLoadError

#: files of a PEFT adapter directory (``PeftModel.save_pretrained``)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def has_adapters(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` holds PEFT adapter layers (a LoRA student)."""
    if model is None:
        return False
    try:
        return bool(_tuner_layers(model))
    except ImportError:  # no peft installed: no adapters either
        return False


def _linear_module_paths(model: torch.nn.Module) -> list[str]:
    """The full names of ``model``'s linear layers (``nn.Linear`` and GPT-2's ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D)) and name]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of ``model``'s linear layers: what ``student.lora.target_modules`` can name, e.g.
    ``['down_proj', 'gate_proj', 'k_proj', 'lm_head', ...]``."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_module_paths(model)})


def check_target_modules(model: torch.nn.Module, targets: Any) -> None:
    """Every entry of ``targets`` must select at least one linear layer of ``model``, by PEFT's rule: a list entry
    matches a module whose name equals it or ends with ``.<entry>``; a string is a regular expression that must match a
    whole module name; ``"all-linear"`` is every linear layer but the output head.

    Raises:
        ConfigError: one line naming what matched nothing and listing the model's linear module names.
    """
    if targets == "all-linear":
        return
    names = _linear_module_paths(model)
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, name) for name in names) else [targets]
    else:
        missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if missing:
        raise ConfigError(f"student.lora.target_modules: {missing} match no linear layer of "
                          f"{type(model).__name__}; its linear modules are {linear_module_names(model)} (or use all-linear)")


def peft_config(cfg: LoraConfig):
    """The ``peft.LoraConfig`` of ``student.lora`` (B = 0 at start: PEFT's ``init_lora_weights=True``)."""
    from peft import LoraConfig as PeftLoraConfig

    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM", init_lora_weights=True)


class LoraStudent:
    """The ``PeftModel`` around a LoRA student; the trainer keeps training the inner Hugging Face model (``model``).

    Args:
        peft_model: what ``peft.get_peft_model`` returned for ``model``.
    """

    def __init__(self, peft_model) -> None:
        self.peft_model = peft_model
        self.model = peft_model.get_base_model()  # the HF model, adapters injected (the same object the trainer holds)

    def save_adapter(self, directory: Path, base_name_or_path: str | None = None) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format; the adapter only), written by rank 0.
        Under ZeRO-3 the adapter's partitions are gathered first (a collective: every rank calls this)."""
        from opd import distributed as dist

        with gathered_adapter(self.model):
            if dist.is_main():
                self.peft_model.save_pretrained(str(directory), safe_serialization=True)
        if not dist.is_main():
            return
        if base_name_or_path is not None:  # where the frozen base comes from (opd-export and PeftModel read it)
            config_file = Path(directory) / ADAPTER_CONFIG
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = base_name_or_path
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True))

    def load_adapter(self, directory: Path) -> None:
        """Load the adapter weights of ``directory`` (:meth:`save_adapter`'s files) into the student in place.

        Raises:
            ValueError: the file's tensors do not fit the student's adapters (another rank or targets).
        """
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        own = {name for name, _ in adapter_tensors(self.model)}
        result = set_peft_model_state_dict(self.peft_model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [key for key in getattr(result, "missing_keys", []) or [] if "lora_" in key]
        if unexpected or missing or len(state) != len(own):
            raise ValueError(f"the adapter in {directory} does not fit this student's (rank or target modules differ): "
                             f"{len(state)} tensors vs {len(own)}; unexpected {unexpected[:3]}, missing {missing[:3]}")


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, seed: int) -> LoraStudent:
    """Inject ``student.lora``'s adapters into ``model`` in place and freeze everything else.

    ``A``'s random initialisation draws from its own generator (seeded by ``seed``), so adding adapters leaves the
    global RNG, hence the run's rollouts and data order, as they were.

    Raises:
        ConfigError: a target that matches no linear layer (one line listing the model's linear module names).
    """
    from peft import get_peft_model

    check_target_modules(model, cfg.target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, peft_config(cfg))
        except ValueError as err:  # PEFT's own checks (a layer type it cannot adapt, ...)
            raise ConfigError(f"student.lora: peft refused the adapters: {str(err).splitlines()[0]}") from None
    return LoraStudent(peft_model)


@contextlib.contextmanager
def gathered_adapter(model: torch.nn.Module) -> Iterator[None]:
    """Inside: a ZeRO-3 student's adapter parameters whole on every rank (read-only); a no-op otherwise."""
    params = [p for name, p in model.named_parameters() if "lora_" in name and hasattr(p, "ds_tensor")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: those that require gradients (all of a full student; a LoRA student's
    adapters only)."""
    return [p for p in model.parameters() if p.requires_grad]


def adapter_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, detached tensor)`` of every adapter weight of a LoRA student (``...lora_A.default.weight``), in a
    fixed order: what a rollout worker needs besides the base it loaded itself."""
    return [(name, param.detach()) for name, param in model.named_parameters() if "lora_" in name]


def merged_named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every weight of a LoRA student under the base model's own names, adapters merged in (``W0 + (alpha/r) B A``),
    tied names included: a checkpoint of the function the student computes, for loaders that know no adapters
    (a vLLM engine, ``save_pretrained``)."""
    deltas = {}  # base model name of an adapted weight -> its (alpha/r) B A
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            deltas[f"{name}.weight"] = sum((module.get_delta_weight(a) for a in module.active_adapters
                                            if a in module.lora_A), torch.zeros_like(module.base_layer.weight))
    return [(name, tensor + deltas[name].to(tensor.dtype) if name in deltas else tensor)
            for name, tensor in base_named_tensors(model)]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Inside: ``model`` computes its base function (every adapter layer off); restored on the way out."""
    layers = _tuner_layers(model)
    was = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, enabled in zip(layers, was):
            layer.enable_adapters(enabled)


class AdaptersOff(torch.nn.Module):
    """A LoRA student seen with its adapters off: the base model, with no second copy of its weights.

    The teacher of self-distillation (``teacher=initial_student``) when the student is a LoRA student: its forward,
    ``generate`` and the hidden-state path (``base_model``) run the student's own modules inside
    :func:`adapters_disabled`. The student is held outside the module tree (its parameters are not this module's), so
    nothing counts or updates them twice.

    Args:
        student: the LoRA student (adapters injected by :func:`apply_lora`), or a submodule of it.
        root: the whole student, whose adapters are switched off (``student`` itself when None).
    """

    def __init__(self, student: torch.nn.Module, root: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.__dict__["_student"] = student  # not registered: its parameters stay the student's only
        self.__dict__["_root"] = student if root is None else root

    def forward(self, *args, **kwargs):
        with adapters_disabled(self._root), torch.no_grad():
            return self._student(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with adapters_disabled(self._root):
            return self._student.generate(*args, **kwargs)

    @property
    def base_model(self) -> AdaptersOff:
        """The inner decoder (hidden states for the chunked loss), adapters off as well."""
        return AdaptersOff(self._student.base_model, self._root)

    def save_pretrained(self, directory, **kwargs) -> None:
        """The base weights as a plain HF directory (a vLLM engine built from this teacher)."""
        kwargs["state_dict"] = {name: tensor.cpu().clone() for name, tensor in base_named_tensors(self._root)}
        self._root.save_pretrained(directory, **kwargs)

    def parameters(self, recurse: bool = True):
        return self._student.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self._student.named_parameters(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_student"], name)


def base_named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every base weight of a LoRA student under the base model's own names (adapters left out)."""
    return [(name.replace(".base_layer.", "."), tensor.detach()) for name, tensor in model.state_dict().items()
            if "lora_" not in name]


def adapter_size_bytes(directory: Path) -> int:
    """Bytes of the adapter files of a checkpoint directory."""
    return sum((Path(directory) / name).stat().st_size for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
               if (Path(directory) / name).is_file())


def is_adapter_directory(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory without a full model beside it (a LoRA student's checkpoint):
    loading it means loading its base and merging the adapter in."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def load_merged(directory: str | Path, base: torch.nn.Module) -> torch.nn.Module:
    """``base`` (a plain HF model) with the adapter of ``directory`` loaded and merged in: a plain model again.

    Raises:
        ModelLoadError: the adapter does not fit ``base``.
    """
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(base, str(directory))
    except Exception as err:  # noqa: BLE001 - peft raises many types for a mismatched adapter
        raise ModelLoadError(f"the adapter in {str(directory)!r} does not fit its base model: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    return peft_model.merge_and_unload()


def lora_rank(model: torch.nn.Module) -> int:
    """The rank r of a LoRA student's adapters."""
    return int(model.peft_config["default"].r)


def write_adapter(model: torch.nn.Module, directory: str | Path) -> int:
    """A LoRA student's current adapter in PEFT's format (what ``PeftModel.save_pretrained`` writes), from the Hugging
    Face model alone (no ``PeftModel`` needed: a vLLM engine's update, a rollout worker). Returns the bytes written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(directory))
    # PEFT's file names its tensors base_model.model.<module>.lora_A.weight (no adapter name)
    state = {f"base_model.model.{name.replace('.default', '')}": tensor.detach().cpu().contiguous()
             for name, tensor in adapter_tensors(model)}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return adapter_size_bytes(directory)
