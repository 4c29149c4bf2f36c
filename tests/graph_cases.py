"""A collective called on padded rows, as `comm/graphs.py` calls it, for the tests that check it
equals the unpadded call (CPU: gloo ranks with the reference codecs, the interpreted kernels)."""

from __future__ import annotations

import torch

from tpcomp_megatron.comm.graphs import pad_into, padded_rows, unpad

OPS = ("one_shot", "two_shot", "reduce_scatter", "all_gather")


def call(comm, op: str, codec, x: torch.Tensor) -> torch.Tensor:
    """The public collective `op` on `x` [rows, hidden]."""
    if op in ("one_shot", "two_shot"):
        return comm.all_reduce(x, codec, algorithm=op)
    if op == "reduce_scatter":
        return comm.reduce_scatter(x, codec)
    return comm.all_gather(x, codec)


def every_op(comm, codec, x: torch.Tensor) -> list[torch.Tensor]:
    """`x` through one-shot and two-shot all-reduce, all-gather and, where its rows split evenly
    over the ranks, reduce-scatter (the results in that order)."""
    out = [comm.all_reduce(x, codec, algorithm="one_shot"), comm.all_reduce(x, codec, algorithm="two_shot"),
           comm.all_gather(x, codec)]
    if x.shape[0] % comm.world_size == 0:
        out.append(comm.reduce_scatter(x, codec))
    return out


def padded_call(comm, op: str, codec, x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """`op` on `x` through a padded input whose extra rows hold `fill`'s (as a graph's static
    input holds earlier calls' rows), the result cut back to `x`'s rows (`graphs.unpad`)."""
    n, (m, hidden) = comm.world_size, x.shape
    rows = padded_rows(op, m, n, codec.pads_rows_exactly)
    buf = fill[:rows].clone()
    pad_into(op, x, buf, n)
    return unpad(op, call(comm, op, codec, buf).reshape(-1, hidden), m, n)


class EagerReplay:
    """A stand-in for `graphs.CudaCapture` on the CPU: the "graph" of some work runs that work
    eagerly at each replay (as a CUDA graph replays what its capture recorded), so the graphs'
    bookkeeping (static buffers, padding, growth, eviction, budget) runs where CUDA does not."""

    device_type = "cpu"

    def __init__(self):
        self.live = 0

    def __call__(self, work, device, stream):
        self.live += 1
        return _Replayed(work, self)


class _Replayed:
    def __init__(self, work, owner: EagerReplay):
        self.work, self.owner = work, owner

    def replay(self) -> None:
        assert self.work is not None, "replay of a graph that was reset"
        self.work("eager", 0)

    def reset(self) -> None:
        assert self.work is not None, "a graph reset twice"
        self.work = None
        self.owner.live -= 1
