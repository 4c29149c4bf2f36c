"""Read Hugging Face checkpoints (safetensors, `.bin`, GGUF) and write them (safetensors).

Sources:
- a folder with `config.json` and `model.safetensors` / `model-*.safetensors` (+ index), read
  lazily tensor by tensor;
- a folder with `pytorch_model.bin` (+ index), read only with `torch.load(weights_only=True)` so a
  checkpoint cannot run code;
- a `.gguf` file (or a folder with exactly one), dequantized to fp32 by transformers `gguf_file=`.

The architecture is checked first, from config.json or the GGUF header alone: an unsupported
model is refused before any tensor is read or de-quantized.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from tpcomp_megatron.models.core.config import TokenizerRef
from tpcomp_megatron.models.core.hf_config import check_architecture

from .errors import SourceError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass
class HFSource:
    """A Hugging Face checkpoint opened for reading: its config and a tensor getter."""

    path: str
    """The folder or GGUF file given."""
    config: dict[str, Any]
    """config.json as a dict."""
    shapes: dict[str, tuple[int, ...]]
    """Every stored tensor's shape, by name."""
    get: Callable[[str], torch.Tensor]
    """Load one tensor by name."""
    tokenizer: TokenizerRef | None
    """Where the tokenizer is, if the source has one."""
    dtype: str | None
    """Dtype of the stored tensors, when uniform."""
    model: Any = None
    """The transformers model, when reading the source needed one (GGUF); reusable as reference."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not valid JSON ({e}); re-download it") from e
    if not isinstance(data, dict):
        raise SourceError(f"{path} must hold a JSON object")
    return data


def _weight_files(folder: Path, index_name: str, single: str, pattern: str) -> list[Path]:
    index = folder / index_name
    if index.exists():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise SourceError(f"{index} lists files that are not there: {missing}")
        return files
    if (folder / single).exists():
        return [folder / single]
    return sorted(folder.glob(pattern))


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _open_safetensors(
    files: list[Path],
) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor], str | None]:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[str] = set()
    handles: dict[Path, Any] = {}
    for f in files:
        try:
            # safe_open checks the header against the file size, so truncation is caught here.
            handle = safe_open(str(f), framework="pt")
            for key in handle.keys():
                sl = handle.get_slice(key)
                shapes[key] = tuple(sl.get_shape())
                dtypes.add(_SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
                where[key] = f
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise SourceError(
                f"cannot read {f} ({type(e).__name__}: {e}); the file is truncated or corrupt, "
                "re-download it"
            ) from e
        handles[f] = handle

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise SourceError(f"tensor {name!r} is not in the checkpoint")
        try:
            return handles[where[name]].get_tensor(name)
        except Exception as e:
            raise SourceError(
                f"cannot read tensor {name!r} from {where[name]} ({e}); the file is truncated or "
                "corrupt, re-download it"
            ) from e

    return shapes, get, dtypes.pop() if len(dtypes) == 1 else None


def _open_bin(
    files: list[Path],
) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor], str | None]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            # weights_only=True: a pickle cannot execute code; mmap keeps memory flat.
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise SourceError(
                f"cannot load {f} with torch.load(weights_only=True) ({e}); it is corrupt or holds "
                "more than tensors: convert it to safetensors first"
            ) from e
        if not isinstance(sd, dict):
            raise SourceError(f"{f} does not hold a state dict")
        odd = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
        if odd:
            raise SourceError(
                f"{f} holds non-tensor entries {odd[:6]}; expected a plain state dict"
            )
        tensors.update(sd)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise SourceError(f"tensor {name!r} is not in the checkpoint")
        return tensors[name]

    names = {str(t.dtype).replace("torch.", "") for t in tensors.values()}
    return shapes, get, names.pop() if len(names) == 1 else None


def _tokenizer_ref(folder: Path) -> TokenizerRef | None:
    if any((folder / n).exists() for n in _TOKENIZER_FILES):
        return TokenizerRef(path=str(folder.resolve()))
    return None


def _open_gguf(file: Path) -> HFSource:
    from .gguf_source import load_gguf_model  # it raises SourceError too (errors.py)

    model = load_gguf_model(file)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf = model.config.to_dict()
    hf.setdefault("architectures", [type(model).__name__])
    if hf.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise SourceError(f"tensor {key!r} is not in the GGUF")
        return sd[key]

    return HFSource(
        path=str(file.resolve()),
        config=hf,
        shapes={k: tuple(v.shape) for k, v in sd.items()},
        get=get,
        tokenizer=TokenizerRef(path=str(file.parent.resolve()), gguf_file=file.name),
        dtype="float32",
        model=model,
    )


def open_hf_source(path: str | os.PathLike[str]) -> HFSource:
    """Open a Hugging Face folder or GGUF file for conversion; SourceError says what is wrong."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"source {p} does not exist")
    if p.is_file():
        if p.suffix == ".gguf":
            return _open_gguf(p)
        raise SourceError(f"source {p} is a file but not .gguf; pass the model folder instead")
    ggufs = sorted(p.glob("*.gguf"))
    if not (p / "config.json").exists():
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0])
        raise SourceError(
            f"{p} has no config.json" + (f" and {len(ggufs)} GGUF files: pass one" if ggufs else "")
        )
    config = _read_json(p / "config.json")
    try:
        check_architecture(config)  # before any weight file is opened
    except ValueError as e:
        raise SourceError(f"{p / 'config.json'}: {e}") from None
    st = _weight_files(p, "model.safetensors.index.json", "model.safetensors", "*.safetensors")
    if st:
        shapes, get, dtype = _open_safetensors(st)
    else:
        bins = _weight_files(
            p, "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"
        )
        if not bins:
            raise SourceError(
                f"{p} has config.json but no *.safetensors or pytorch_model*.bin weights"
            )
        shapes, get, dtype = _open_bin(bins)
    return HFSource(
        path=str(p.resolve()),
        config=config,
        shapes=shapes,
        get=get,
        tokenizer=_tokenizer_ref(p),
        dtype=dtype,
    )


def write_hf_folder(
    folder: str | os.PathLike[str],
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    tokenizer_from: str | None = None,
) -> None:
    """Write `config.json` + `model.safetensors` (+ the tokenizer files found in `tokenizer_from`)."""
    import shutil

    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if tokenizer_from and Path(tokenizer_from).is_dir():
        for name in _TOKENIZER_FILES + ("special_tokens_map.json", "generation_config.json"):
            src = Path(tokenizer_from) / name
            if src.exists():
                shutil.copy2(src, out / name)
