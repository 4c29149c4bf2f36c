"""Megatron-core integration: what a user asks (`config.py`), its deployment on a model
(`deploy.py`), attaching it (`apply.py`), the compressible layers and their mappings."""

from .apply import CompressionHandle, apply_tp_compression, compressed_layer_spec
from .config import CompressionConfig
from .deploy import Deployment, read_inputs, resolve, to_recipe
from .layers import CompressedColumnParallelLinear, CompressedRowParallelLinear
from .mappings import LayerCompression

__all__ = [
    "CompressedColumnParallelLinear", "CompressedRowParallelLinear", "CompressionConfig",
    "CompressionHandle", "Deployment", "LayerCompression", "apply_tp_compression", "compressed_layer_spec",
    "read_inputs", "resolve", "to_recipe",
]
