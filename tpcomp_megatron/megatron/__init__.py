"""Megatron-core integration: compressible layers, their mappings, and how to apply them."""

from .apply import CompressionConfig, CompressionHandle, apply_tp_compression, compressed_layer_spec
from .layers import CompressedColumnParallelLinear, CompressedRowParallelLinear
from .mappings import LayerCompression

__all__ = [
    "CompressedColumnParallelLinear", "CompressedRowParallelLinear", "CompressionConfig",
    "CompressionHandle", "LayerCompression", "apply_tp_compression", "compressed_layer_spec",
]
