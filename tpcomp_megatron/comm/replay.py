"""Replays: each distinct collective call set up once, then run with nothing but its work.

A model calls the same few collectives with the same shapes on every forward (two per layer).
Everything about such a call but the tensor's contents is then fixed by (operation, shape, dtype,
codec, stream): the gate's answer and the bytes counted, the codec kernels' launch plans
(`ops.prepare_encode` / `ops.prepare_decode`), the payload buffers' shapes. A replay is a closure
over all of that: a call costs one dict lookup, the kernel launches, the process-group call, the
output's allocation and the counters. The general path's layers (gate lookup, the ops' dispatch,
plan lookups, payload allocations, views) cost more host time inside a model's forward than in
a loop (benchmarks/results/host_overhead_*.md): in an eager prefill that is time to first token.

Payload buffers. A replay keeps the payloads it sends and receives from call to call when they
fit `PERSIST_BYTES`, up to `BUDGET_BYTES` per communicator; larger ones are allocated per call
(large messages are GPU-bound, and kept buffers would hold memory the activations could use).
Reuse is safe because a replay serves one stream (the stream is in its key): the next call's
encode is queued behind this call's decode, and the collective library orders its own stream
with the caller's, as for any synchronous collective. Under CUDA-graph capture no replay is
used or built: the general path runs, and the graph's pool owns its tensors.

Not replayed (the general path runs): error feedback, the symmetric-memory transport, a
non-contiguous input, a two-shot all-reduce whose rows do not split evenly over the ranks.
A replay gives the general path's bytes: same plans, same order (tested for every codec).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .. import ops
from ..codecs.base import REDUCED
from . import transport
from .transport import run as _run, sources as _sources

if TYPE_CHECKING:
    from .collectives import CompressedComm

Tensor = torch.Tensor
PERSIST_BYTES = 16 << 20
"""Payload bytes (sent and received) a replay keeps between calls; above, allocated per call."""
BUDGET_BYTES = 64 << 20
"""Kept payload bytes per communicator; replays built past it allocate per call."""
MAX_REPLAYS = 256
"""Replays kept per communicator; past this they start afresh (prompt lengths without bound)."""

_MISSING = object()
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)  # (C calls: the public
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)     # wrappers cost more)


class Replays:
    """The replays of one communicator, by (operation, shape, dtype, codec, stream)."""

    def __init__(self, comm: "CompressedComm"):
        self._comm = comm
        self._runs: dict = {}
        self._kept = 0  # bytes of payload buffers kept by the replays

    def get(self, op: str, x: Tensor, codec) -> Callable[[Tensor], Tensor] | None:
        """The replay of `op` ('one_shot', 'two_shot', 'reduce_scatter', 'all_gather') for `x`,
        built on first use; None where the general path must run."""
        if torch.compiler.is_compiling():
            return None  # traced: the general path, whose calls Dynamo knows
        if x.is_cuda:
            if _capturing():
                return None
            stream = _raw_stream(x.get_device())
        else:
            stream = 0
        if not x.is_contiguous():
            return None
        key = (op, x.shape, x.dtype, codec, stream)
        run = self._runs.get(key, _MISSING)
        if run is _MISSING:
            if len(self._runs) >= MAX_REPLAYS:
                self._runs.clear()
                self._kept = 0
            run = self._runs[key] = self._build(op, x, codec)
        return run

    # -- building --------------------------------------------------------------------------------
    def _buffers(self, shapes: tuple, device: torch.device, views: Callable) -> Callable[[], tuple]:
        """`fn()` -> `views(*buffers)`, the buffers uint8 tensors of `shapes`: the same ones each
        call (kept, when they fit the limits) or new ones."""
        size = sum(a * b for a, b in shapes)

        def new() -> tuple:
            return views(*(torch.empty(s, dtype=torch.uint8, device=device) for s in shapes))

        if size > PERSIST_BYTES or self._kept + size > BUDGET_BYTES:
            return new
        self._kept += size
        kept = new()
        return lambda: kept

    def _build(self, op: str, x: Tensor, codec):
        comm = self._comm
        why, sent, exact = comm._why(op, x, codec, 1.0)
        if why:
            return _exact(comm, op, why)
        if op == "one_shot" and comm._symm_wanted and x.is_cuda:
            return None
        n, h = comm.world_size, x.shape[-1]
        m = x.numel() // h
        if op == "two_shot" and m % n:
            return None  # rows padded to split evenly: the general path
        build = {"one_shot": _one_shot, "two_shot": _two_shot, "reduce_scatter": _reduce_scatter,
                 "all_gather": _all_gather}[op]
        return build(comm, codec, x, m, h, codec.row_bytes(h), self._buffers, sent, exact)


def _exact(comm: "CompressedComm", op: str, why: str) -> Callable[[Tensor], Tensor]:
    fallback = {"one_shot": comm._exact_all_reduce, "two_shot": comm._exact_all_reduce,
                "reduce_scatter": comm._exact_reduce_scatter, "all_gather": comm._exact_all_gather}[op]
    return lambda x: fallback(x, why)


def _gathered(comm, codec, x, m, h, rb, buffers, sent, exact, *, mode: str, out_shape: tuple, what: str):
    """Encode own rows, all-gather the n payloads, decode them (`mode` 'sum': the one-shot
    all-reduce, summed in rank order; 'each': the all-gather, every shard decoded)."""
    n, group = comm.world_size, comm.group
    bufs = buffers(((m, rb), (n * m, rb)), x.device, lambda p, g: (p, g, g.view(n, m, rb)))
    payload, _, gathered = bufs()
    encode = ops.prepare_encode(codec, x.view(m, h), source=comm.rank, out=payload)
    decode = ops.prepare_decode(codec, gathered, h, sources=_sources(n), dtype=x.dtype, mode=mode)

    def gathered_call(x: Tensor) -> Tensor:
        payload, flat, gathered = bufs()
        encode(x.view(m, h), payload)
        _run(what, group, transport.gather_into, flat, payload)
        out = decode(gathered)
        comm.stats.record_compressed(sent, exact)
        return out.view(out_shape)
    return gathered_call


def _one_shot(comm, codec, x, m, h, rb, buffers, sent, exact):
    return _gathered(comm, codec, x, m, h, rb, buffers, sent, exact, mode="sum", out_shape=x.shape,
                     what="all-reduce (one-shot all-gather)")


def _all_gather(comm, codec, x, m, h, rb, buffers, sent, exact):
    return _gathered(comm, codec, x, m, h, rb, buffers, sent, exact, mode="each",
                     out_shape=(x.shape[0] * comm.world_size,) + tuple(x.shape[1:]), what="all-gather")


def _two_shot(comm, codec, x, m, h, rb, buffers, sent, exact):
    """Encode, all-to-all (rank i gets every rank's chunk i), decode-sum-requantize own chunk,
    all-gather the reduced chunks, decode each."""
    n, group, shape = comm.world_size, comm.group, x.shape
    chunk = m // n
    bufs = buffers(((m, rb), (m, rb), (m, rb)), x.device,
                   lambda p, r, g: (p, r, r.view(n, chunk, rb), g, g.view(n, chunk, rb)))
    payload, _, received, _, gathered = bufs()
    encode = ops.prepare_encode(codec, x.view(m, h), source=comm.rank, out=payload)
    reduce = ops.prepare_decode(codec, received, h, sources=_sources(n), dtype=torch.float32, mode="encode",
                                out_source=REDUCED)
    decode = ops.prepare_decode(codec, gathered, h, sources=_sources(n, REDUCED), dtype=x.dtype, mode="each")

    def two_shot(x: Tensor) -> Tensor:
        payload, received_flat, received, gathered_flat, gathered = bufs()
        encode(x.view(m, h), payload)
        _run("all-reduce (two-shot all-to-all)", group, transport.all_to_all_into, received_flat, payload)
        reduced = reduce(received)
        _run("all-reduce (two-shot all-gather)", group, transport.gather_into, gathered_flat, reduced)
        out = decode(gathered)
        comm.stats.record_compressed(sent, exact)
        return out.view(shape)
    return two_shot


def _reduce_scatter(comm, codec, x, m, h, rb, buffers, sent, exact):
    """Encode, all-to-all, decode-and-sum own chunk (rows split along dim 0)."""
    n, group = comm.world_size, comm.group
    out_shape = (x.shape[0] // n,) + tuple(x.shape[1:])
    bufs = buffers(((m, rb), (m, rb)), x.device, lambda p, r: (p, r, r.view(n, m // n, rb)))
    payload, _, received = bufs()
    encode = ops.prepare_encode(codec, x.view(m, h), source=comm.rank, out=payload)
    decode = ops.prepare_decode(codec, received, h, sources=_sources(n), dtype=x.dtype, mode="sum")

    def reduce_scatter(x: Tensor) -> Tensor:
        payload, flat, received = bufs()
        encode(x.view(m, h), payload)
        _run("reduce-scatter (all-to-all)", group, transport.all_to_all_into, flat, payload)
        out = decode(received)
        comm.stats.record_compressed(sent, exact)
        return out.view(out_shape)
    return reduce_scatter
