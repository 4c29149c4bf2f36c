"""A GGUF file as a transformers model (fp32, eager), its architecture checked first.

The check reads only the header's scalar keys (`gguf_header`), so an unsupported model is refused
in milliseconds, before transformers parses the header again and de-quantizes every tensor; so is
one whose header gives sizes its tensors cannot hold (`check_gguf_sizes`), before transformers
builds a model of that size.
Used by the converter (`open_hf_source`) and by the quality tools (`--model FILE.gguf`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from tpcomp_megatron.models.core.families import by_gguf_architecture, gguf_architectures
from tpcomp_megatron.models.core.hf_config import MAX_SIZE

from .errors import SourceError
from .gguf_header import GGUFHeaderError, read_gguf_header, read_gguf_metadata


def gguf_architecture(file: str | Path) -> tuple[str, dict[str, Any]]:
    """The GGUF's `general.architecture` (SourceError unless we convert it) and its scalar metadata
    up to the tokenizer keys; reads the header only."""
    meta = read_gguf_metadata(file, stop=lambda key: key.startswith("tokenizer."))
    arch = meta.get("general.architecture")
    known = gguf_architectures()  # every registered family's
    if not isinstance(arch, str) or arch not in known:
        supported = ", ".join(f"{a} ({c})" for a, c in known.items())
        raise SourceError(f"unsupported architecture {arch!r} in the GGUF {file}; supported GGUF "
                          f"architectures: {supported}")
    return str(arch), meta


# `<arch>.<field>` -> the tensor (and its dimension, GGUF order) that holds that many rows or
# columns, so the size can be no larger; None: no tensor tells, only MAX_SIZE bounds it.
_SIZE_FIELDS = {
    "embedding_length": ("token_embd.weight", 0),  # must equal it
    "vocab_size": ("token_embd.weight", 1),
    "feed_forward_length": ("blk.0.ffn_up.weight", 1),
    "attention.head_count": ("blk.0.attn_q.weight", 1),
    "attention.head_count_kv": ("blk.0.attn_k.weight", 1),
    "attention.key_length": ("blk.0.attn_q.weight", 1),
    "attention.value_length": ("blk.0.attn_v.weight", 1),
    "rope.dimension_count": ("blk.0.attn_q.weight", 1),
    "context_length": None,
    "attention.sliding_window": None,
}
_BLOCK = re.compile(r"blk\.(\d+)\.")


def check_gguf_sizes(file: str | Path, arch: str) -> None:
    """Refuse a GGUF whose header gives a size its tensors cannot hold (GGUFHeaderError naming the
    file and field), before transformers builds anything from it: a block_count of 10**8 would
    build 10**8 layers, tensor dimensions past the file's size would be allocated."""
    meta, tensors = read_gguf_header(file)
    _check_tensor_bytes(file, tensors)

    def refuse(field: str, value: Any, why: str) -> GGUFHeaderError:
        return GGUFHeaderError(f"{file}: GGUF field '{arch}.{field}' is {value!r:.60}, but {why}; the file is "
                               "corrupt or its header was edited: re-download it")

    def size(field: str) -> int | None:
        value = meta.get(f"{arch}.{field}")
        if value is None:  # absent, or a per-layer array (transformers reads those itself)
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
            raise refuse(field, value, f"a size must be an integer in [1, {MAX_SIZE}]")
        return value

    blocks = {int(m.group(1)) for name in tensors if (m := _BLOCK.match(name))}
    count = size("block_count")
    if count is not None and count > len(blocks):
        raise refuse("block_count", count, f"the file holds tensors of {len(blocks)} blocks (blk.N.*)")
    largest = max((d for dims, _ in tensors.values() for d in dims), default=0)
    for field, where in _SIZE_FIELDS.items():
        value = size(field)
        if value is None or where is None:
            continue
        name, dim = where
        dims = tensors.get(name, ((largest,) * 2, 0))[0]
        held = dims[dim] if dim < len(dims) else 1
        what = f"{name} has dimensions {list(dims)}" if name in tensors else f"no tensor has a dimension above {largest}"
        if value > held or (field == "embedding_length" and name in tensors and value != held):
            raise refuse(field, value, what)
    head_dim = size("attention.key_length") or size("rope.dimension_count")
    for field, name in (("attention.head_count", "blk.0.attn_q.weight"), ("attention.head_count_kv", "blk.0.attn_k.weight")):
        heads, dims = size(field), tensors.get(name, ((),))[0]
        if heads and head_dim and len(dims) > 1 and heads * head_dim > dims[1]:  # each alone may fit, the product not
            raise refuse(field, heads, f"{heads} heads of {head_dim} need {heads * head_dim} columns and {name} has {dims[1]}")


def _check_tensor_bytes(file: str | Path, tensors: dict[str, tuple[tuple[int, ...], int]]) -> None:
    """Every tensor's data, by its dimensions and type, must fit in the file."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError as e:
        raise SourceError("reading GGUF needs transformers and gguf: pip install transformers gguf") from e
    room = os.path.getsize(file)
    total = 0
    for name, (dims, kind) in tensors.items():
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise GGUFHeaderError(f"{file}: GGUF tensor {name!r} has the unknown GGML type {kind}; the file is "
                                  "corrupt, or needs a newer gguf package") from None
        total += -(-math.prod(dims) // block) * block_bytes
        if total > room:
            raise GGUFHeaderError(f"{file}: GGUF tensor {name!r} of dimensions {list(dims)} does not fit in the "
                                  f"file ({room} bytes) with the tensors before it: the file is corrupt or cut short")


def _config_override(folder: str, name: str, arch: str, meta: dict[str, Any]) -> dict[str, Any]:
    """`config=` for transformers where its GGUF reader would get the model wrong: the fields the
    family's `read_gguf` gives (e.g. a Qwen3's head_dim, which transformers does not read), set on
    the config transformers reads; {} when there are none."""
    read_gguf = by_gguf_architecture(arch).read_gguf
    fields = read_gguf(arch, meta) if read_gguf is not None else {}
    if not fields:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for key, value in fields.items():
        setattr(config, key, value)
    return {"config": config}


def load_gguf_model(file: str | Path) -> Any:
    """The transformers model of a GGUF file, de-quantized to fp32, eager attention, eval mode."""
    file = Path(file)
    arch, meta = gguf_architecture(file)
    check_gguf_sizes(file, arch)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SourceError("reading GGUF needs transformers and gguf: pip install transformers gguf") from e
    folder, name = str(file.parent), file.name
    try:
        # One load only: transformers parses the GGUF header in Python (seconds per pass), so the
        # config comes from the model rather than a separate AutoConfig call.
        return AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager",
            **_config_override(folder, name, arch, meta),
        ).eval()
    except Exception as e:
        raise SourceError(f"transformers cannot load the GGUF {file} ({type(e).__name__}: {e})") from e
