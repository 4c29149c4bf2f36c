"""Eager compressed collectives replayed from CUDA graphs, one graph per padded row count.

An eager prefill below a few thousand tokens is host-bound: the GPU waits for the launches, so
every microsecond of host time a collective adds is a microsecond of TTFT. A compressed
collective is three to five host steps (encode, one or two process-group calls, one or two
decodes: about 150 us for a two-shot all-reduce), where the exact one is one. A CUDA graph of
the whole collective makes it three host steps: copy the rows into a static input, replay, copy
the result out. The same kernels run on the same bytes, so the result is the same.

A server sees a new prompt length on nearly every request, so a graph per exact row count would
be captured on nearly every request. Graphs are instead kept per *graph row count*
(`graph_rows`): the row count itself up to `EXACT_ROWS`, above it rounded up to one of
`GRAPH_STEPS` steps per octave (at most 6.25% padding rows, 3% on average), as vLLM pads a batch
to its captured sizes. Rows are coded independently (`codecs.base.row_bucket`), so the first m
rows of a padded call are the m rows of the unpadded one, bit for bit; the padding rows hold
whatever the static input held (earlier calls' rows, zeros at first) and are dropped. A codec
whose rows go through a library GEMM (`Codec.pads_rows_exactly` False: the low-rank codec, whose
cuBLAS matmul may pick another algorithm for another row count) gets graphs per exact row count.
A reduce-scatter pads each rank's chunk, so every rank keeps its own rows; a two-shot all-reduce
pads to a multiple of the ranks (equal chunks).

* the first call of a (collective, graph row count) runs eagerly on the padded static input (it
  compiles and loads whatever kernels the row count specializes);
* the second captures the collective (the same code, `collectives.py`, in capture mode: its
  payload buffers from the graph memory pool) on a side stream, reading the static input and
  writing the static output;
* from then on a call is copy in, replay, copy out (`Graphs.run`), through the views of the
  static buffers set up once per exact call (`_Call`: about 2 us of Python besides the copies).

The collective's last decode writes the static output itself (the decode plans' `out`), so a
replayed call moves the message's bytes twice more than a stepped one (the copies in and out),
GPU time that is hidden where the forward is host-bound.

The graphs of one collective (operation, codec value, hidden, dtypes, device, stream) share one
static input and one static output, sized for the largest graph captured (grown by doubling: a
growth drops the collective's graphs, recaptured on later calls). Graphs of one stream share one
memory pool: they replay one at a time on their stream, so their payloads may overlap, and a
capture after the first few allocates nothing from CUDA (an eviction frees nothing: a `cudaFree`
would stall the device). Kept: the static buffers within `BUDGET_BYTES` per communicator (the
least recently used collective's dropped first, with its graphs and calls) and at most
`MAX_GRAPHS` graphs (least recently used first). A call whose padded input exceeds
`MAX_INPUT_BYTES` stays eager: there the forward is GPU-bound (the host time is hidden anyway)
and the copies would cost GPU time. A capture that fails (a process group that cannot be
captured) is logged, and the communicator's calls stay eager from then on. Every rank sees the
same calls, so every rank captures and replays at the same calls, and graphs of NCCL collectives
stay matched across ranks. A server captures them all at start-up instead
(`CompressedComm.capture_graphs`, `CompressionHandle.capture_graphs(max_tokens)`: largest first,
so the static buffers are sized once), as vLLM captures its batch sizes.

Measured on one H100 (`benchmarks/results/serving_h100_2026-12-07-graphs.md`: a graph per exact
row count, private pools then): TTFT overhead of a 200-request trace +22% -> +6% at 70B x80
TP=8, +11% -> +8% at 13B x40 TP=2.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

Tensor = torch.Tensor
EXACT_ROWS = 32
"""Row counts up to which a graph serves one row count (no padding)."""
GRAPH_STEPS = 16
"""Graph row counts per octave above `EXACT_ROWS` (padding at most 1/16 of the rows)."""
MAX_INPUT_BYTES = 32 << 20
"""Padded input bytes above which a call stays eager (GPU-bound there; the copies would cost GPU time)."""
BUDGET_BYTES = 256 << 20
"""Bytes of static inputs and outputs kept per communicator."""
MAX_GRAPHS = 1024
"""Captured graphs kept per communicator (least recently used dropped first)."""
MAX_SEEN = 4096
"""Graph keys remembered as seen once (the oldest forgotten first)."""
MAX_CALLS = 4096
"""Exact calls whose set-up (`_Call`) is kept (the oldest dropped first)."""


def graph_rows(m: int) -> int:
    """The row count of the graph that serves calls of `m` rows: m up to `EXACT_ROWS`, above it m
    rounded up to a multiple of 1/`GRAPH_STEPS` of its octave's lower end (33-64 rows: even
    counts; 65-128: multiples of 4; ...)."""
    if m <= EXACT_ROWS:
        return m
    step = max(1, (1 << ((m - 1).bit_length() - 1)) // GRAPH_STEPS)
    return -(-m // step) * step


def graph_row_counts(op: str, max_rows: int, n: int) -> list[int]:
    """One row count per graph of `op`'s calls on 1 to `max_rows` rows at world size n (a
    reduce-scatter's: multiples of n): the largest that pads to each padded row count
    (`padded_rows`), largest first."""
    step = n if op == "reduce_scatter" else 1
    largest = {}
    for m in range(step, max_rows + 1, step):
        largest[padded_rows(op, m, n, True)] = m
    return sorted(largest.values(), reverse=True)


def padded_rows(op: str, m: int, n: int, pads: bool) -> int:
    """Rows of the padded call of `op` on m rows at world size n (`pads`: the codec's rows may
    be padded); a reduce-scatter pads each of its n chunks, a two-shot all-reduce to n equal ones."""
    if not pads:
        return m
    if op == "reduce_scatter":
        return n * graph_rows(m // n)
    if op == "two_shot":  # n equal chunks, so the last decode writes the static output itself
        return -(-graph_rows(m) // n) * n
    return graph_rows(m)


def out_rows(op: str, rows: int, n: int) -> int:
    """Output rows of `op` on `rows` input rows at world size n."""
    return {"reduce_scatter": rows // n, "all_gather": rows * n}.get(op, rows)


def pad_into(op: str, x: Tensor, dst: Tensor, n: int) -> None:
    """Write `x` [m, hidden] into the padded input `dst` [M, hidden] (`padded_rows`): its first m
    rows, or for a reduce-scatter the first m/n rows of each of the n chunks; the rest untouched."""
    m, hidden = x.shape
    if op == "reduce_scatter":
        dst.view(n, dst.shape[0] // n, hidden)[:, :m // n].copy_(x.view(n, m // n, hidden))
    else:
        dst[:m].copy_(x)


def unpad(op: str, y: Tensor, m: int, n: int, into: Tensor | None = None) -> Tensor:
    """The result of `op` on m rows from `y`, the result on the padded rows, copied into a new
    tensor (or into `into`, an all-reduce's own input, m rows)."""
    hidden = y.shape[-1]
    if op == "all_gather":
        out = y.new_empty((n * m, hidden))
        out.view(n, m, hidden).copy_(y.view(n, -1, hidden)[:, :m])
        return out
    rows = out_rows(op, m, n)
    if into is not None:
        return into.view(rows, hidden).copy_(y[:rows])
    return y[:rows].clone()


class _Statics:
    """The static input and output of one collective's graphs (`rows` input rows at most)."""

    __slots__ = ("inp", "out", "rows", "nbytes", "graphs", "calls")

    def __init__(self, inp: Tensor, out: Tensor, rows: int):
        self.inp, self.out, self.rows = inp, out, rows
        self.nbytes = inp.numel() * inp.element_size() + out.numel() * out.element_size()
        self.graphs: set = set()  # keys of the graphs that read and write these buffers
        self.calls: set = set()  # keys of the calls holding views of them


class _Graph:
    __slots__ = ("graph", "live")

    def __init__(self, graph):
        self.graph, self.live = graph, True

    def reset(self) -> None:
        self.live = False
        self.graph.reset()


class _Call:
    """One exact call's way through a graph: its graph key, its rows' place in the static input
    (`dst`) and its result's in the static output (`src`), and the graph once captured."""

    __slots__ = ("key", "statics", "dst", "src", "chunks", "graph")

    def __init__(self, key: tuple, statics: _Statics, dst: Tensor, src: Tensor, chunks: tuple | None):
        self.key, self.statics, self.dst, self.src, self.chunks = key, statics, dst, src, chunks
        self.graph: _Graph | None = None


class CudaCapture:
    """Captures work into CUDA graphs: on a side stream per device, into one memory pool per
    (device, stream the graphs replay on)."""

    device_type = "cuda"

    def __init__(self):
        self._side: dict = {}
        self._pools: dict = {}

    def __call__(self, work: Callable[[str, int], None], device: torch.device, stream: int):
        """A CUDA graph of `work("capture", 0)`, to replay on `stream` (the current stream)."""
        side = self._side.get(device.index)
        if side is None:
            side = self._side[device.index] = torch.cuda.Stream(device)
        pool = self._pools.get((device.index, stream))
        if pool is None:
            pool = self._pools[(device.index, stream)] = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(device)
        graph = torch.cuda.CUDAGraph()
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    work("capture", 0)
                finally:
                    graph.capture_end()
        finally:
            current.wait_stream(side)
        return graph


class Graphs:
    """One communicator's captured collectives (see the module docstring). `capture`: how work is
    captured into a graph (`CudaCapture`; tests replay it eagerly on the CPU instead)."""

    def __init__(self, n: int, budget: int = BUDGET_BYTES, max_input: int = MAX_INPUT_BYTES,
                 max_graphs: int = MAX_GRAPHS, capture=None):
        self.n, self.budget, self.max_input, self.max_graphs = n, budget, max_input, max_graphs
        self.capture = capture if capture is not None else CudaCapture()
        self._graphs: OrderedDict = OrderedDict()  # (family key, padded rows) -> _Graph
        self._statics: OrderedDict = OrderedDict()  # family key -> _Statics
        self._calls: OrderedDict = OrderedDict()  # exact call key -> _Call, or None (never served)
        self._seen: OrderedDict = OrderedDict()
        self.nbytes = 0  # static buffers kept
        self.captured = 0  # graphs captured so far
        self.replays = 0

    def serves(self, device: torch.device) -> bool:
        """Whether eager calls on `device` may go through graphs."""
        return device.type == self.capture.device_type and self.max_input >= 0

    def run(self, op: str, codec, x: Tensor, out_dtype: torch.dtype, stream: int,
            body: Callable[..., Tensor], into: Tensor | None = None) -> Tensor | None:
        """`body(rows, mode, stream, out=None)` (the collective `op` on `x` [m, hidden], an eager
        call on `stream`, into `out` when given) through the graph of its padded row count, into
        `into` (an all-reduce's input, when the caller allows) or a new tensor; None where the call
        must run as it is (the padded input over `max_input`, its buffers over the budget, or a
        failed capture)."""
        ckey = (op, codec, x.shape, x.dtype, out_dtype, x.device, stream)
        call = self._calls.get(ckey)
        if call is None:
            if ckey in self._calls:  # never served (over max_input, or over the budget alone)
                return None
            call = self._call(ckey, x, out_dtype)
            if call is None:
                return None
        call.dst.copy_(x if call.chunks is None else x.view(call.chunks))
        graph = call.graph
        if graph is None or not graph.live:  # (the hot path skips this: copy in, replay, copy out)
            graph = self._graphs.get(call.key)
            if graph is None:
                inp = call.statics.inp[:call.key[1]]
                if call.key not in self._seen:  # first sight: eagerly, on the padded input (compiles its kernels)
                    if len(self._seen) >= MAX_SEEN:
                        self._seen.popitem(last=False)
                    self._seen[call.key] = True
                    return unpad(op, body(inp, "eager", stream), x.shape[0], self.n, into)
                del self._seen[call.key]
                graph = self._capture(call.key, call.statics, inp, body)
                if graph is None:
                    return unpad(op, body(inp, "eager", stream), x.shape[0], self.n, into)
            call.graph = graph
        self._graphs.move_to_end(call.key)
        graph.graph.replay()
        self.replays += 1
        return self._take(op, call.src, into)

    @staticmethod
    def _take(op: str, src: Tensor, into: Tensor | None) -> Tensor:
        """The call's result (`src`, its view of the static output) copied out."""
        if into is not None:  # an all-reduce's input: its rows, as `src`
            return into.copy_(src)
        if op == "all_gather":  # [n, m, hidden] of [n, rows, hidden]
            return src.clone(memory_format=torch.contiguous_format).view(-1, src.shape[-1])
        return src.clone()

    def _call(self, ckey: tuple, x: Tensor, out_dtype: torch.dtype) -> _Call | None:
        """Set up the exact call `ckey` (its padded rows, static buffers and their views); None
        where it cannot be served (its padded input over `max_input`, its buffers over the whole
        budget: remembered)."""
        op, codec, n, (m, hidden) = ckey[0], ckey[1], self.n, x.shape
        rows = padded_rows(op, m, n, getattr(codec, "pads_rows_exactly", True))
        if m == 0 or rows * hidden * x.element_size() > self.max_input:
            self._remember(ckey, None)
            return None
        family = (op, codec, hidden, x.dtype, out_dtype, x.device, ckey[-1])
        statics = self._statics_for(family, rows, x, out_dtype)
        if statics is None:
            self._remember(ckey, None)
            return None
        inp, out, chunks = statics.inp[:rows], statics.out[:out_rows(op, rows, n)], None
        if op == "reduce_scatter":
            chunks = (n, m // n, hidden)
            dst, src = inp.view(n, rows // n, hidden)[:, :m // n], out[:m // n]
        elif op == "all_gather":
            dst, src = inp[:m], out.view(n, rows, hidden)[:, :m]
        else:
            dst, src = inp[:m], out[:m]
        call = _Call((family, rows), statics, dst, src, chunks)
        self._remember(ckey, call)
        statics.calls.add(ckey)
        return call

    def _remember(self, ckey: tuple, call: _Call | None) -> None:
        if len(self._calls) >= MAX_CALLS:
            old_key, old = self._calls.popitem(last=False)
            if old is not None:
                old.statics.calls.discard(old_key)
        self._calls[ckey] = call

    def _statics_for(self, family: tuple, rows: int, x: Tensor, out_dtype: torch.dtype) -> _Statics | None:
        """The static buffers of `family`, holding at least `rows` input rows (grown by doubling,
        up to `max_input`; a growth drops the family's graphs); None where they cannot fit the budget."""
        statics = self._statics.get(family)
        if statics is not None and statics.rows >= rows:
            self._statics.move_to_end(family)
            return statics
        op, hidden, size = family[0], x.shape[1], x.element_size()
        grown = rows
        if statics is not None:  # double, within max_input (a reduce-scatter's rows: a multiple of n)
            cap = self.max_input // (hidden * size)
            grown = max(rows, min(cap - cap % self.n if op == "reduce_scatter" else cap, 2 * statics.rows))
        nbytes = grown * hidden * size + out_rows(op, grown, self.n) * hidden * out_dtype.itemsize
        if nbytes > self.budget:
            return None
        if statics is not None:
            self._drop_family(family)
        for old in list(self._statics):  # least recently used first
            if self.nbytes + nbytes <= self.budget:
                break
            self._drop_family(old)
        inp = torch.zeros((grown, hidden), dtype=x.dtype, device=x.device)
        out = torch.empty((out_rows(op, grown, self.n), hidden), dtype=out_dtype, device=x.device)
        statics = self._statics[family] = _Statics(inp, out, grown)
        self.nbytes += statics.nbytes
        return statics

    def _drop_family(self, family: tuple) -> None:
        """Drop a collective's static buffers, its graphs and the calls holding views of them."""
        statics = self._statics.pop(family)
        for key in statics.graphs:
            self._graphs.pop(key).reset()
        for ckey in statics.calls:
            del self._calls[ckey]
        self.nbytes -= statics.nbytes

    def _capture(self, key: tuple, statics: _Statics, inp: Tensor, body: Callable) -> _Graph | None:
        target = statics.out[:out_rows(key[0][0], inp.shape[0], self.n)]

        def work(mode: str, stream: int) -> None:  # the collective, its result into the static output
            y = body(inp, mode, stream, target)
            if y.data_ptr() != target.data_ptr():  # (a codec whose two-shot rows pad inside the collective)
                target.copy_(y.reshape(target.shape))

        try:
            graph = _Graph(self.capture(work, inp.device, key[0][-1]))
        except Exception as e:  # noqa: BLE001 (the calls run eagerly from now on)
            logging.getLogger("tpcomp_megatron").warning(
                "compressed collective %s: CUDA-graph capture failed (%s: %s); this communicator's "
                "collectives run eagerly from now on", key[0][0], type(e).__name__, e)
            self.max_input = -1
            return None
        if len(self._graphs) >= self.max_graphs:
            old_key, old = self._graphs.popitem(last=False)
            self._statics[old_key[0]].graphs.discard(old_key)
            old.reset()
        self._graphs[key] = graph
        statics.graphs.add(key)
        self.captured += 1
        return graph
