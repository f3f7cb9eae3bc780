"""Loading teacher and student: one code path for shipped toy checkpoints and hub models."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from opd.config import ModelConfig
from opd.errors import ModelLoadError
from opd.models.gguf import dequantized_checkpoint, is_gguf_source, resolve_gguf_file
from opd.models.lora import ADAPTER_CONFIG, is_adapter_directory, load_merged
from opd.models.pruning import prune_layers

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.exists(path)


def check_model_path(spec: ModelConfig, role: str) -> None:
    """A local ``name_or_path`` must be a saved model directory with a readable ``config.json``.

    Hub ids are checked when loaded.

    Args:
        spec: the ``teacher`` or ``student`` config node.
        role: "teacher" or "student" (for messages).

    Raises:
        ModelLoadError: naming ``<role>.name_or_path`` and the path.
    """
    path = os.path.expanduser(spec.name_or_path)
    if is_gguf_source(path):  # pkg:<package>/<file>.gguf or a .gguf file: the file must exist
        resolve_gguf_file(path, f"{role}.name_or_path")
        return
    if not _looks_local(path):
        return
    if not Path(path).is_dir():
        raise ModelLoadError(f"{role}.name_or_path: no model directory at {path!r}")
    if is_adapter_directory(path):  # a LoRA student's checkpoint
        base_spec(path, role)
        return
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{role}.name_or_path: {path!r} has no config.json (not a saved model directory)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise ModelLoadError(f"{role}.name_or_path: {str(config_file)!r} is not a readable JSON model config "
                             f"({reason})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{role}.name_or_path: {str(config_file)!r} holds a JSON {type(config).__name__}, "
                             "not a model config object")


def load_tokenizer(spec: ModelConfig, role: str):
    """The tokenizer for ``spec`` (``spec.tokenizer`` or the model path), left-padded, with a pad token."""
    from transformers import AutoTokenizer

    check_model_path(spec, role)
    source = os.path.expanduser(spec.tokenizer or spec.name_or_path)
    if is_gguf_source(source):  # the tokenizer saved next to the dequantized weights
        source = str(dequantized_checkpoint(source, f"{role}.tokenizer" if spec.tokenizer else f"{role}.name_or_path"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - hub/offline/format errors arrive as many types
        raise ModelLoadError(_load_message(role, source, err)) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.add_bos_token is not None:
        set_bos_rule(tokenizer, spec.add_bos_token, role)
    return tokenizer


def set_bos_rule(tokenizer, add_bos: bool, role: str) -> None:
    """Make ``tokenizer(text)`` start with its BOS token (``add_bos=True``) or not, and check that it now does.

    Some tokenizers converted from GGUF drop the model's BOS rule: Gemma-3's adds no ``<bos>``, and the model then
    degenerates (``tests/test_cross_tokenizer.py`` measures it by the loss on a fixed sentence).
    """
    if add_bos and tokenizer.bos_token_id is None:
        raise ModelLoadError(f"{role}.add_bos_token=true, but the tokenizer has no BOS token")
    tokenizer.add_bos_token = add_bos
    first = tokenizer("a")["input_ids"][:1]
    if (first == [tokenizer.bos_token_id]) != add_bos:
        raise ModelLoadError(f"{role}.add_bos_token={str(add_bos).lower()}: this tokenizer "
                             f"({type(tokenizer).__name__}) does not follow the setting; leave it null")


def load_model(spec: ModelConfig, role: str, device: torch.device):
    """``AutoModelForCausalLM.from_pretrained`` with checks and one-line errors.

    Args:
        spec: the ``teacher`` or ``student`` config node.
        role: "teacher" or "student" (for messages).
        device: where to put the model.
    """
    from transformers import AutoModelForCausalLM

    check_model_path(spec, role)
    path = os.path.expanduser(spec.name_or_path)
    if is_adapter_directory(path):
        # a LoRA checkpoint: its base as that run loaded it, with the adapter merged in (a plain model again)
        base = load_model(dataclasses.replace(base_spec(path, role), dtype=spec.dtype), role, device)
        return load_merged(path, base).to(device)
    if is_gguf_source(path):  # dequantized once into a cached HF checkpoint (opd/models/gguf.py)
        path = str(dequantized_checkpoint(path, f"{role}.name_or_path"))
    kwargs = {"dtype": _DTYPES.get(spec.dtype, spec.dtype)}
    if device.type == "cpu" and spec.dtype in ("bfloat16", "float16"):
        warnings.warn(f"{role}: {spec.dtype} on a CPU is far slower than float32 (about 60x for bf16 matmuls on "
                      f"common server CPUs); set {role}.dtype=float32 unless you need it.", stacklevel=2)
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                                     use_safetensors=spec.use_safetensors, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(_load_message(role, path, err)) from None
    if spec.keep_layers is not None:  # a depth-pruned copy (opd/models/pruning.py)
        try:
            prune_layers(model, spec.keep_layers, f"{role}.keep_layers")
        except ValueError as err:
            raise ModelLoadError(str(err)) from None
    return model.to(device)


#: written next to a LoRA checkpoint's adapter: the student config its base was loaded with (minus ``lora``)
BASE_SPEC_FILE = "opd_base_model.json"


def save_base_spec(spec: ModelConfig, directory: Path) -> None:
    """Record in ``directory`` how the frozen base of a LoRA student was loaded (path, layers kept, BOS rule)."""
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "lora"}
    (Path(directory) / BASE_SPEC_FILE).write_text(json.dumps(fields, indent=2, sort_keys=True))


def base_spec(directory: str | Path, role: str) -> ModelConfig:
    """The base model's config of a LoRA checkpoint (:func:`save_base_spec`), else PEFT's ``base_model_name_or_path``.

    Raises:
        ModelLoadError: neither names a base model.
    """
    recorded = Path(directory) / BASE_SPEC_FILE
    if recorded.is_file():
        return ModelConfig(**json.loads(recorded.read_text()))
    base = json.loads((Path(directory) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{role}.name_or_path: {str(directory)!r} holds a LoRA adapter but names no base model "
                             f"({ADAPTER_CONFIG} has no base_model_name_or_path)")
    return ModelConfig(name_or_path=base)


def _load_message(role: str, source: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    hint = ""
    if not _looks_local(source):
        hint = (" Hub models need network access to huggingface.co or a local cache (HF_HUB_OFFLINE=1 uses the cache "
                "only); offline, point name_or_path at a local directory.")
    return f"{role}: could not load {source!r}: {first}.{hint}"


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher, student) -> int:
    """Teacher and student must share a tokenizer for token-level distillation; returns the shared vocabulary size.

    Output layers whose row counts differ only by padding past the tokenizer (Qwen2.5: 151,936 rows in
    the small models, 152,064 in the 7B and larger ones, one tokenizer of 151,665 ids) are accepted: the
    shared size is the smaller row count, the largest width at which both models have a logit. The
    extra rows of the larger head are padding, never a token id, so the trainer cuts both models'
    logits to it (``opd.models.scoring.trim_vocabulary``); the rows below it that are padding in both are kept, exactly as
    for a pair whose padded heads have the same size, so a pair differing only by padding trains as
    if the larger head had been resized to the smaller one.

    Returns:
        V: the row count both models keep.
    Raises:
        ModelLoadError: naming the first difference of the tokenizers, or both row counts when the
            smaller head would cut a real token id.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        detail = f"tokens only in the teacher's: {only_t}, only in the student's: {only_s}" if (only_t or only_s) \
            else "the same tokens map to different ids"
        raise ModelLoadError(f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} entries; {detail}). "
                             "Token-level distillation needs one shared vocabulary.")
    t_rows = teacher.get_output_embeddings().weight.shape[0]
    s_rows = student.get_output_embeddings().weight.shape[0]
    if t_rows == s_rows:
        return s_rows
    num_ids = max(len(student_tokenizer), max(s_vocab.values(), default=-1) + 1)  # ids 0..num_ids-1 are real
    if num_ids > min(t_rows, s_rows):
        raise ModelLoadError(f"teacher and student output layers differ in size (teacher {t_rows} vs student {s_rows} "
                             f"rows) and the smaller one has no row for some of the tokenizer's {num_ids} ids; resize "
                             "the smaller model's embeddings so the logits line up.")
    return min(t_rows, s_rows)
