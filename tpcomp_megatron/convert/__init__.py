"""Checkpoint tooling: Hugging Face Llama-family, Gemma and Qwen2/3 checkpoints <-> Megatron-core TP
layouts.

gguf_header / gguf_source (architecture check from the header, then the de-quantized model) ->
hf_io (read HF/GGUF, write HF) -> mapping (key map, padding, TP sharding) -> writers (atomic
output, legacy and torch_dist formats) -> pipeline (both directions) -> load (into a GPTModel at any
TP) -> rope_check + verify (rope fields, then logits, vs transformers) -> cli (`tpcomp-convert`).
"""

import importlib
from typing import Any

# Loaded on first use (PEP 562), so that importing the package, as `python -m tpcomp_megatron.convert`
# does before its __main__, imports no Megatron-core: its import-time warnings are filtered in
# __main__ (quiet.py), which runs after this file.
_SOURCES = {
    "hf_io": ("HFSource", "SourceError", "open_hf_source", "write_hf_folder"),
    "load": ("available_formats", "load_config", "load_megatron_model"),
    "mapping": ("MappingError", "hf_to_megatron", "megatron_to_hf", "merge_shards", "shard_for_rank"),
    "pipeline": ("convert_hf_to_megatron", "convert_megatron_to_hf", "read_megatron_global"),
    "verify": ("VerifyReport", "compare_logits", "verify_checkpoint"),
    "writers": ("CONFIG_NAME", "FORMATS", "LEGACY", "TORCH_DIST", "atomic_output"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


__all__ = [
    "CONFIG_NAME",
    "FORMATS",
    "HFSource",
    "LEGACY",
    "MappingError",
    "SourceError",
    "TORCH_DIST",
    "VerifyReport",
    "atomic_output",
    "available_formats",
    "compare_logits",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "hf_to_megatron",
    "load_config",
    "load_megatron_model",
    "megatron_to_hf",
    "merge_shards",
    "open_hf_source",
    "read_megatron_global",
    "shard_for_rank",
    "verify_checkpoint",
    "write_hf_folder",
]
