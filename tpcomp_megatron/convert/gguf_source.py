"""A GGUF file as a transformers model (fp32, eager), its architecture checked first.

The check reads only the header's scalar keys (`gguf_header`), so an unsupported model is refused
in milliseconds, before transformers parses the header again and de-quantizes every tensor.
Used by the converter (`open_hf_source`) and by the quality tools (`--model FILE.gguf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tpcomp_megatron.models.hf_config import GGUF_ARCHITECTURES

from .gguf_header import read_gguf_metadata
from .hf_io import SourceError


def gguf_architecture(file: str | Path) -> tuple[str, dict[str, Any]]:
    """The GGUF's `general.architecture` (SourceError unless we convert it) and its scalar metadata
    up to the tokenizer keys; reads the header only."""
    meta = read_gguf_metadata(file, stop=lambda key: key.startswith("tokenizer."))
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(f"{a} ({c})" for a, c in GGUF_ARCHITECTURES.items())
        raise SourceError(f"unsupported architecture {arch!r} in the GGUF {file}; supported GGUF "
                          f"architectures: {supported}")
    return str(arch), meta


def _config_override(folder: str, name: str, arch: str, meta: dict[str, Any]) -> dict[str, Any]:
    """`config=` for transformers where its GGUF reader would get the model wrong: it does not read
    `qwen3.attention.key_length` and takes Qwen3Config's default head_dim (128, right for every
    released Qwen3), so a Qwen3 with another head_dim needs its config corrected."""
    key_length = meta.get(f"{arch}.attention.key_length")
    if arch != "qwen3" or key_length is None:
        return {}
    from transformers import AutoConfig, Qwen3Config

    if int(key_length) == Qwen3Config().head_dim:
        return {}
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.head_dim = int(key_length)
    return {"config": config}


def load_gguf_model(file: str | Path) -> Any:
    """The transformers model of a GGUF file, de-quantized to fp32, eager attention, eval mode."""
    file = Path(file)
    arch, meta = gguf_architecture(file)
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
