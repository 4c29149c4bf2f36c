"""Checkpoint tooling: Hugging Face Llama-family, Gemma and Qwen2/3 checkpoints <-> Megatron-core TP
layouts.

gguf_header / gguf_source (architecture check from the header, then the de-quantized model) ->
hf_io (read HF/GGUF, write HF) -> mapping (key map, padding, TP sharding) -> writers (atomic
output, legacy and torch_dist formats) -> pipeline (both directions) -> load (into a GPTModel at any
TP) -> verify (logits vs transformers) -> cli (`tpcomp-convert`).
"""

from .hf_io import HFSource, SourceError, open_hf_source, write_hf_folder
from .load import available_formats, load_config, load_megatron_model
from .mapping import MappingError, hf_to_megatron, megatron_to_hf, merge_shards, shard_for_rank
from .pipeline import convert_hf_to_megatron, convert_megatron_to_hf, read_megatron_global
from .verify import VerifyReport, compare_logits, verify_checkpoint
from .writers import CONFIG_NAME, FORMATS, LEGACY, TORCH_DIST, atomic_output

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
