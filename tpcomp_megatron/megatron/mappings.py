"""Autograd wrappers of the compressed collectives, matching Megatron-core's mappings.

Forward compresses; backward is exact, as Megatron's own mappings do it (compression targets
inference; gradients through a lossy forward stay the gradients of what the forward computed):
* all-reduce (row-parallel output): backward passes the gradient through unchanged;
* reduce-scatter to the sequence-parallel region: backward all-gathers along dim 0;
* all-gather from the sequence-parallel region: backward reduce-scatters along dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..codecs.base import Codec
from ..comm.collectives import CompressedComm
from ..comm.feedback import ErrorFeedback, PostNorm

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class LayerCompression:
    """What one layer compresses with: the group's communicator, the layer's codec and, with error
    feedback on, the debt state this rank's reductions share."""

    comm: CompressedComm
    codec: Codec | None
    """None: an exact reduction (a layer left exact while error feedback is on)."""
    feedback: ErrorFeedback | None = None
    norm: PostNorm | None = None
    """With feedback: the post-norm the layer's output passes before the residual add (Gemma 2/3)."""


def _exact_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] * n,) + tuple(x.shape[1:]))
    _all_gather(out.view(-1), x.contiguous().view(-1), group=group)
    return out


def _exact_reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out.view(-1), x.contiguous().view(-1), group=group)
    return out


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lc: LayerCompression):
        return lc.comm.all_reduce(x, lc.codec, feedback=lc.feedback, norm=lc.norm)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lc: LayerCompression):
        ctx.group = lc.comm.group
        return lc.comm.reduce_scatter(x, lc.codec, feedback=lc.feedback, norm=lc.norm)

    @staticmethod
    def backward(ctx, grad):
        return _exact_gather_dim0(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lc: LayerCompression):
        ctx.group = lc.comm.group
        return lc.comm.all_gather(x, lc.codec)

    @staticmethod
    def backward(ctx, grad):
        return _exact_reduce_scatter_dim0(grad, ctx.group), None


# Without a gradient to track (inference) the collectives are called directly: an autograd
# Function's apply costs host time on every call even when it records nothing.
def _needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def compressed_reduce_from_tensor_parallel_region(x: torch.Tensor, lc: LayerCompression) -> torch.Tensor:
    if _needs_grad(x):
        return _AllReduce.apply(x, lc)
    # x is the layer's partial sum, used by nothing else: an exact reduction may take it in place
    return lc.comm.all_reduce(x, lc.codec, feedback=lc.feedback, norm=lc.norm, in_place=True)


def compressed_reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, lc: LayerCompression) -> torch.Tensor:
    if _needs_grad(x):
        return _ReduceScatter.apply(x, lc)
    return lc.comm.reduce_scatter(x, lc.codec, feedback=lc.feedback, norm=lc.norm)


def compressed_gather_from_sequence_parallel_region(x: torch.Tensor, lc: LayerCompression) -> torch.Tensor:
    if _needs_grad(x):
        return _AllGather.apply(x, lc)
    return lc.comm.all_gather(x, lc.codec)
