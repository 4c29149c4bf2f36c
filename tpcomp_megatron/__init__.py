"""tpcomp-megatron: compressed tensor-parallel communication for Megatron-core inference.

The pipeline, one folder each: codecs (what a payload is) -> kernels (how fast) -> comm (who sends
what) -> megatron (where Megatron calls it) -> tools/examples (how people use it).
"""

__version__ = "0.1.0"
