"""Eager compressed collectives replayed from CUDA graphs, one graph per exact call.

An eager prefill below a few thousand tokens is host-bound: the GPU waits for the launches, so
every microsecond of host time a collective adds is a microsecond of TTFT. A compressed
collective is three to five host steps (encode, one or two process-group calls, one or two
decodes: about 150 us for a two-shot all-reduce), where the exact one is one. But within one
forward every layer calls the same collective with the same row count (80 layers: 160 calls of
one or two kinds), so a CUDA graph of the whole collective, captured once per exact call, serves
the rest of the forward and every later request of that length:

* the first call of a key (operation, codec value, rows, hidden, dtypes, device, stream) runs
  eagerly (it compiles and loads whatever kernels the row count specializes);
* the second captures the collective (the same code, `collectives.py`, in capture mode: its
  buffers from the graph's private pool) on a side stream, reading a static input;
* from then on a call is three host steps: copy its rows into the static input, replay, copy
  the result out (`Graphs.run`): the same kernels on the same bytes, so the same result.

The graphs of one stream share one memory pool: what a capture frees (the payloads) the next
capture reuses, and an evicted graph's output goes back to the pool, so captures after the first
few allocate nothing from CUDA and evictions free nothing (a `cudaFree` would stall the device).
Graphs sharing a pool replay one at a time on their stream, so their payloads may overlap. Each
graph keeps its input and output alive (`nbytes`); `Graphs` keeps them least recently used within
`BUDGET_BYTES` per communicator, and a call whose input exceeds `MAX_INPUT_BYTES` stays eager:
there the forward is GPU-bound (the host time is hidden anyway) and the two copies would cost GPU
time. A capture that fails (a process group that cannot be captured) is logged, and the
communicator's calls stay eager from then on. Every rank sees the same calls, so every rank
captures and replays at the same calls, and graphs of NCCL collectives stay matched across ranks.

Measured on one H100 (`benchmarks/results/serving_h100_2026-12-07-graphs.md`, private pools then):
TTFT overhead of a 200-request trace +22% -> +6% at 70B x80 TP=8, +11% -> +8% at 13B x40 TP=2.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

Tensor = torch.Tensor
MAX_INPUT_BYTES = 32 << 20
"""Input bytes above which a call stays eager (GPU-bound there; the copies would cost GPU time)."""
BUDGET_BYTES = 256 << 20
"""Bytes of captured graphs' inputs and outputs kept per communicator (the payloads they share)."""
MAX_SEEN = 4096
"""Keys remembered as seen once (the oldest forgotten first)."""


class _Graph:
    __slots__ = ("graph", "inp", "out", "nbytes")

    def __init__(self, graph, inp: Tensor, out: Tensor, nbytes: int):
        self.graph, self.inp, self.out, self.nbytes = graph, inp, out, nbytes


class Graphs:
    """One communicator's captured collectives (see the module docstring)."""

    def __init__(self, budget: int = BUDGET_BYTES, max_input: int = MAX_INPUT_BYTES):
        self.budget, self.max_input = budget, max_input
        self._graphs: OrderedDict = OrderedDict()  # key -> _Graph
        self._seen: OrderedDict = OrderedDict()
        self._side: dict = {}  # device index -> the side stream captures run on
        self._pools: dict = {}  # (device index, stream) -> the memory pool its graphs share
        self.nbytes = 0
        self.captured = 0  # graphs captured so far
        self.replays = 0

    def wants(self, in_bytes: int, out_bytes: int) -> bool:
        """Whether an eager CUDA call of `in_bytes` in, `out_bytes` out may go through a graph."""
        return in_bytes <= self.max_input and in_bytes + out_bytes <= self.budget

    def run(self, key: tuple, x: Tensor, body: Callable[[Tensor], Tensor], into: Tensor | None = None) -> Tensor | None:
        """`body(x)` through the graph of `key` (its last item the stream the call runs on; `body`:
        the collective, in capture mode), into `into` (x's size) when given, else into a new
        tensor; None where the call must run eagerly (first sight of the key, or its capture failed)."""
        g = self._graphs.get(key)
        if g is None:
            if key not in self._seen:
                if len(self._seen) >= MAX_SEEN:
                    self._seen.popitem(last=False)
                self._seen[key] = True
                return None
            del self._seen[key]
            g = self._capture(key, x, body)
            if g is None:
                return None
        self._graphs.move_to_end(key)
        g.inp.copy_(x)
        g.graph.replay()
        self.replays += 1
        if into is None:
            return g.out.clone()
        return into.view(g.out.shape).copy_(g.out)

    def _capture(self, key: tuple, x: Tensor, body: Callable[[Tensor], Tensor]):
        device = x.device
        side = self._side.get(device.index)
        if side is None:
            side = self._side[device.index] = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        pool = self._pools.get((device.index, key[-1]))
        if pool is None:
            pool = self._pools[(device.index, key[-1])] = torch.cuda.graph_pool_handle()
        inp = torch.empty_like(x)
        graph = torch.cuda.CUDAGraph()
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    out = body(inp)
                finally:
                    graph.capture_end()
        except Exception as e:  # noqa: BLE001 (the calls run eagerly from now on)
            logging.getLogger("tpcomp_megatron").warning(
                "compressed collective %s: CUDA-graph capture failed (%s: %s); this communicator's "
                "collectives run eagerly from now on", key[0], type(e).__name__, e)
            self.budget = 0
            return None
        finally:
            current.wait_stream(side)
        nbytes = inp.numel() * inp.element_size() + out.numel() * out.element_size()
        g = _Graph(graph, inp, out, nbytes)
        self._make_room(nbytes)
        self._graphs[key] = g
        self.nbytes += nbytes
        self.captured += 1
        return g

    def _make_room(self, nbytes: int) -> None:
        """Drop the least recently used graphs until `nbytes` more fit the budget."""
        for key in list(self._graphs):
            if self.nbytes + nbytes <= self.budget:
                break
            old = self._graphs.pop(key)
            self.nbytes -= old.nbytes
            old.graph.reset()
