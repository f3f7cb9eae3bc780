"""Turn a training checkpoint into a plain Hugging Face model directory.

Usage:
    opd-export logs/<name>/runs/<time>/checkpoints/step_000400 distilled-student/
    opd-export <checkpoint> <out> --from-zero    # rebuild the weights from the DeepSpeed ZeRO partitions

A LoRA student's checkpoint holds its adapter (PEFT's format) instead: the export loads the base the run loaded
(``opd_base_model.json``), merges the adapter in and saves a plain directory that loads without peft.

Every other checkpoint already holds the whole student as HF files (``config.json``, ``model.safetensors``,
tokenizer); under ZeRO-3 they are consolidated at save time. ``--from-zero`` (the default when the
HF weights are missing, e.g. deleted to save space) rebuilds them in float32 from the per-rank
partitions in ``<checkpoint>/deepspeed/`` with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``,
on the CPU, in one process. The output loads with ``AutoModelForCausalLM.from_pretrained(out)``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from opd.config import ModelConfig
from opd.errors import OPDError
from opd.models.lora import is_adapter_directory

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, from_zero: bool | None = None) -> Path:
    """Write ``checkpoint``'s student to ``out_dir`` as a ``save_pretrained`` directory.

    Args:
        checkpoint: ``.../checkpoints/step_N`` of a run.
        out_dir: the new model directory (must not exist, or be empty).
        from_zero: rebuild from ZeRO partitions (True), copy the HF weights (False), or decide by what
            the checkpoint holds (None: the HF weights when present).

    Raises:
        OPDError: a missing or unreadable checkpoint, or a non-empty ``out_dir``.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if is_adapter_directory(checkpoint) and not from_zero:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise OPDError(f"{str(out_dir)!r} exists and is not empty; choose a new directory")
        _export_merged_adapter(checkpoint, out_dir)
        return out_dir
    if not (checkpoint / "config.json").is_file():
        raise OPDError(f"{str(checkpoint)!r} is not a checkpoint directory (no config.json); pass "
                       ".../checkpoints/step_<N> of a run")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OPDError(f"{str(out_dir)!r} exists and is not empty; choose a new directory")
    has_hf = any(checkpoint.glob("*.safetensors"))
    zero_dir = checkpoint / "deepspeed"
    if from_zero is None:
        from_zero = not has_hf
    if from_zero and not zero_dir.is_dir():
        raise OPDError(f"{str(checkpoint)!r} has no DeepSpeed partitions (deepspeed/); it was not saved under ZeRO"
                       + ("" if has_hf else " and has no HF weights either"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if from_zero:
        _export_from_zero(checkpoint, zero_dir, out_dir)
    else:
        for file in checkpoint.glob("*.safetensors*"):
            shutil.copy2(file, out_dir / file.name)
        shutil.copy2(checkpoint / "config.json", out_dir / "config.json")
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(checkpoint / name, out_dir / name)
    return out_dir


def _export_merged_adapter(checkpoint: Path, out_dir: Path) -> None:
    """A LoRA student's checkpoint: its base, loaded as the run loaded it (``opd_base_model.json``), with the adapter
    merged in (``W0 + (alpha/r) B A``; peft's ``merge_and_unload``), saved as a plain HF directory with the tokenizer."""
    import torch

    from opd.errors import ModelLoadError
    from opd.models.loading import load_model

    try:
        model = load_model(ModelConfig(name_or_path=str(checkpoint)), "checkpoint", torch.device("cpu"))
    except ModelLoadError as err:
        raise OPDError(str(err)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out_dir / name)


def _export_from_zero(checkpoint: Path, zero_dir: Path, out_dir: Path) -> None:
    """float32 weights gathered from every rank's ZeRO partitions, saved with ``save_pretrained``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from opd.engine.backends import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (zero_dir / "latest").read_text().strip() if (zero_dir / "latest").is_file() else None
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(zero_dir), tag=tag)
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises bare ValueError/FileNotFoundError/KeyError here
        raise OPDError(f"cannot read the ZeRO partitions in {str(zero_dir)!r}: {type(err).__name__}: {err}") from None
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise OPDError(f"the ZeRO partitions do not match {checkpoint / 'config.json'}: missing "
                       f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.save_pretrained(out_dir, safe_serialization=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``opd-export``."""
    parser = argparse.ArgumentParser(prog="opd-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run's checkpoints/step_<N> directory")
    parser.add_argument("out_dir", help="the new HF model directory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-zero", dest="from_zero", action="store_true", default=None,
                        help="rebuild the weights from the DeepSpeed ZeRO partitions (deepspeed/)")
    source.add_argument("--from-hf", dest="from_zero", action="store_false", help="copy the consolidated HF weights")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.from_zero)
    except OPDError as err:
        print(f"opd-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"opd-export: wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    main()
