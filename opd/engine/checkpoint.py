"""Checkpoints: the student as a plain HF directory plus the trainer state, written atomically.

Layout of ``<run_dir>/checkpoints/step_000100/``::

    config.json, model.safetensors, tokenizer files   # usable anywhere with from_pretrained
    (LoRA students: adapter_config.json, adapter_model.safetensors, opd_base_model.json instead of the weights:
     PeftModel.from_pretrained(base, dir) loads them; opd-export merges them into a plain HF directory)
    trainer_state.pt                                  # optimizer, scheduler, RNG, data position, step
    deepspeed/zero/, rng_rank<r>.pt                   # DeepSpeed runs only: ZeRO partitions of every rank, RNGs
    COMPLETE                                          # written last: marks the checkpoint as whole

The HF files hold the whole student also under ZeRO-3 (consolidated at save time); ``opd-export``
rebuilds them from the ZeRO partitions alone when needed.

A checkpoint is written to ``step_000100.tmp`` and renamed when complete, so a kill mid-write never
leaves a directory that looks finished.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPLETE_MARKER = "COMPLETE"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(as_python_rng_state(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def as_python_rng_state(state: Any) -> tuple:
    """``random.setstate`` wants nested tuples; a round trip through ``torch.load`` may give lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model`` in place (tied weights may be absent from the file).

    Raises:
        ValueError: if the file's tensors do not match the model.
    """
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{checkpoint} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {checkpoint} does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict[str, Any], keep: int,
                    state_dict: dict[str, torch.Tensor] | None = None, write_shards=None,
                    in_flight: dict[int, list[dict[str, Any]]] | None = None, write_model=None) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and delete all but the newest ``keep`` complete ones.

    Over N processes every rank must call this (it synchronises): ``write_shards(tmp_dir)`` lets each
    rank write its DeepSpeed ZeRO partitions (under ``deepspeed/``), each rank writes its RNG state
    (``rng_rank<r>.pt``), and rank 0 writes the HF weights (``state_dict``: the consolidated
    weights; the module's own when None), the tokenizer and ``trainer_state.pt``, then renames. ``in_flight``:
    this rank's rollouts already written for the coming steps (``trainer.max_staleness``), in
    ``in_flight_rank<r>.pt``; a resumed run trains on them instead of sampling those steps again.
    ``write_model(tmp_dir)``: every rank calls it (it may gather); it writes the student its own way instead of
    ``save_pretrained`` (a LoRA student's adapter, :meth:`opd.models.lora.LoraStudent.save_adapter`).
    Multi-node runs need ``run_dir`` on a filesystem every node sees.
    """
    from opd import distributed as dist

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if write_shards is not None:
        write_shards(tmp)
    if write_model is not None:
        write_model(tmp)
    if dist.world_size() > 1:
        torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    if in_flight:
        torch.save(in_flight, tmp / f"in_flight_rank{dist.rank()}.pt")
    if dist.is_main():
        if write_model is None:
            model.save_pretrained(tmp, safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
    dist.barrier()  # every rank's files are in before the checkpoint is marked complete
    if dist.is_main():
        (tmp / COMPLETE_MARKER).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written ``.tmp`` directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=True)


def load_in_flight(checkpoint: Path) -> dict[int, list[dict[str, Any]]]:
    """This rank's in-flight rollouts of a checkpoint (step -> batch states), or {} if it has none."""
    from opd import distributed as dist

    path = Path(checkpoint) / f"in_flight_rank{dist.rank()}.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer state loads; broken ones are skipped with a warning."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            load_trainer_state(checkpoint)
            return checkpoint
        except Exception as err:  # noqa: BLE001 - any unreadable file means "skip this one"
            warnings.warn(f"skipping unreadable checkpoint {checkpoint}: {err}", stacklevel=2)
    return None
