"""Megatron-core linear layers whose tensor-parallel communication can be compressed.

Each subclass overrides only where Megatron communicates, and only while a `LayerCompression` is
attached as `tp_compression` (by `apply_tp_compression`); with none attached, `forward` is the
parent's, so the model is bit-identical to stock Megatron. Megatron's `layers.py` imports its
mappings by name, so replacing the mappings module would not reach these calls: hence subclasses.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from .mappings import (
    LayerCompression,
    compressed_gather_from_sequence_parallel_region,
    compressed_reduce_from_tensor_parallel_region,
    compressed_reduce_scatter_to_sequence_parallel_region,
)


class CompressedRowParallelLinear(RowParallelLinear):
    """`RowParallelLinear` whose output all-reduce (or sequence-parallel reduce-scatter) is
    compressed when `tp_compression` is set. Returns `(output, bias)` like the parent."""

    tp_compression: LayerCompression | None = None

    def forward(self, input_: torch.Tensor):
        lc = self.tp_compression
        if lc is None or self.explicit_expert_comm or not self.input_is_parallel:
            return super().forward(input_)
        # Same local matmul as the parent (no communication inside it for row-parallel layers).
        output_parallel = self._forward_impl(
            input=input_,
            weight=self.weight,
            bias=None,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            allreduce_dgrad=False,
            sequence_parallel=False,
            tp_group=None,
            grad_output_buffer=None,
        )
        if self.sequence_parallel:
            output_ = compressed_reduce_scatter_to_sequence_parallel_region(output_parallel, lc)
        else:
            output_ = compressed_reduce_from_tensor_parallel_region(output_parallel, lc)
        if self.skip_bias_add:
            return output_, self.bias
        return (output_ + self.bias if self.bias is not None else output_), None


class CompressedColumnParallelLinear(ColumnParallelLinear):
    """`ColumnParallelLinear` whose sequence-parallel input all-gather is compressed when
    `tp_compression` is set (only meaningful with sequence parallelism)."""

    tp_compression: LayerCompression | None = None

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None):
        lc = self.tp_compression
        if lc is None or not self.sequence_parallel or self.explicit_expert_comm or self.config.defer_embedding_wgrad_compute:
            return super().forward(input_, weight, runtime_gather_output)
        if weight is None:
            weight = self.weight
        total_input = compressed_gather_from_sequence_parallel_region(input_, lc)
        # The gather is done: run the parent's local matmul as if sequence parallelism were off
        # (its backward reduce-scatter is done by our gather's backward instead).
        output_parallel = self._forward_impl(
            input=total_input,
            weight=weight,
            bias=self.bias if not self.skip_bias_add else None,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            allreduce_dgrad=False,
            sequence_parallel=False,
            grad_output_buffer=None,
            wgrad_deferral_limit=None,
            tp_group=self.tp_group,
        )
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            raise ValueError("compressed sequence-parallel all-gather with gather_output=True is not supported")
        return output_parallel, (self.bias if self.skip_bias_add else None)
