"""Set-up state of the compressed collectives, shared by every layer and every prompt length.

A model calls the same few collectives over and over (two per layer, per forward), with a row
count that changes with every prompt. What a call needs besides its tensor is set up once per
*kit* key: (operation, codec value, hidden size, dtypes, device, stream, row bucket), where the
codec compares by value (`Codec.identity`: every layer with the same codec shares one kit) and
the row bucket is the power of two at or above the row count (`kernels.plans.row_bucket`):

* the codec kernels' launch plans (`ops.prepare_encode` / `ops.prepare_decode`), launched for the
  call's rows (`kernels.launch.Launcher.run`), so a new prompt length sets up nothing;
* the payload buffers, sized for the bucket's largest row count and kept between calls where they
  fit `PERSIST_BYTES`, their views per row count cached (`MAX_VIEWS`).

`Kits` holds them least-recently-used first, and keeps the bytes of kept buffers within
`BUDGET_BYTES` per communicator by evicting the least recently used kits' buffers (never a
wholesale clear); a kit whose buffers could not be kept allocates per call. Reusing kept buffers
is safe because a kit serves one stream (the stream is in its key): the next call's encode is
queued behind this call's decode, and the collective library orders its stream with the caller's.

Under CUDA-graph capture the kits' plans run with buffers allocated per call (the graph's pool
owns them); under torch.compile the codec steps are the traced custom ops (`ops.encode` ...). The
algorithms themselves (`collectives.py`) are written once over a kit.
"""

from __future__ import annotations

from collections import OrderedDict
import torch

from .. import ops
from ..codecs.base import REDUCED, row_bucket
from .transport import sources as _sources

Tensor = torch.Tensor
PERSIST_BYTES = 16 << 20
"""Payload bytes (sent and received) a kit keeps between calls; above, allocated per call."""
BUDGET_BYTES = 64 << 20
"""Kept payload bytes per communicator, least recently used kits' released first."""
MAX_KITS = 512
"""Kits per communicator (a kit without kept buffers is a few plans' references)."""
MAX_VIEWS = 64
"""Buffer views kept per kit, one set per row count (the oldest dropped first)."""

_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)  # (C calls: the public
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)     # wrappers cost more)


def call_mode(x: Tensor) -> tuple[str, int]:
    """('eager' | 'capture' | 'traced', stream) of a call on `x`."""
    if torch.compiler.is_compiling():
        return "traced", 0
    if x.is_cuda:
        if _capturing():
            return "capture", 0
        return "eager", _raw_stream(x.get_device())
    return "eager", 0


def _layout(op: str, n: int, m: int) -> tuple[int, tuple]:
    """(rows per chunk, the payload buffers' row counts) of `op` over m rows at world size n."""
    if op == "one_shot" or op == "all_gather":
        return m, (m, n * m)  # own payload, the n gathered
    if op == "two_shot":
        chunk = -(-m // n)
        return chunk, (n * chunk, n * chunk, n * chunk)  # own (padded), received, gathered
    return m // n, (m, m)  # reduce_scatter: own, received


class Kit:
    """The set-up state of one collective for one (codec value, hidden, dtypes, device, stream,
    row bucket): prepared codec steps and payload buffers (see the module docstring)."""

    def __init__(self, op: str, codec, n: int, rank: int, hidden: int, in_dtype: torch.dtype, out_dtype: torch.dtype,
                 device: torch.device, bucket: int, traced: bool):
        self.op, self.n, self.device = op, n, device
        self.rb = codec.row_bytes(hidden)
        chunk, rows = _layout(op, n, bucket)
        self.capacity = tuple(r * self.rb for r in rows)
        self.nbytes = sum(self.capacity)
        self._kept: tuple | None = None
        self._views: dict = {}
        # what decode_each decodes: every rank's shard, or (two-shot) the chunks reduced by their owners
        each_sources = _sources(n, REDUCED) if op == "two_shot" else _sources(n)
        if traced:  # the traced custom ops (torch.compile)
            self.encode = lambda x, out: ops.encode(codec, x, source=rank, out=out)
            self.decode_sum = lambda p, out=None: ops.decode_sum(codec, p, hidden, sources=_sources(n),
                                                                 dtype=out_dtype, out=out)
            self.decode_each = lambda p, out=None: ops.decode_each(codec, p, hidden, sources=each_sources,
                                                                   dtype=out_dtype, out=out)
            self.reduce = lambda p: ops.decode_sum_encode(codec, p, hidden, sources=_sources(n), out_source=REDUCED)
            return
        # Plans for the bucket's largest tensors (index width), from stand-ins of its shape that
        # allocate nothing: a plan reads its call's row count from the tensors it is given.
        x = torch.empty(1, hidden, dtype=in_dtype, device=device).expand(bucket, hidden)
        self.encode = ops.prepare_encode(codec, x, source=rank)
        payloads = torch.empty(1, dtype=torch.uint8, device=device).expand(n, chunk, self.rb)

        def decode(mode: str, sources: tuple = _sources(n), dtype: torch.dtype = out_dtype, out_source: int = 0):
            return ops.prepare_decode(codec, payloads, hidden, sources=sources, dtype=dtype, mode=mode,
                                      out_source=out_source)
        if op in ("one_shot", "reduce_scatter"):
            self.decode_sum = decode("sum")
        elif op == "all_gather":
            self.decode_each = decode("each", sources=each_sources)
        else:
            self.reduce = decode("encode", dtype=torch.float32, out_source=REDUCED)
            self.decode_each = decode("each", sources=each_sources)

    def keep(self) -> None:
        """Allocate the buffers to keep between calls."""
        self._kept = tuple(torch.empty(c, dtype=torch.uint8, device=self.device) for c in self.capacity)

    def release(self) -> None:
        """Drop the kept buffers and their views (the kit allocates per call from now on)."""
        self._kept = None
        self._views.clear()

    @property
    def kept_bytes(self) -> int:
        return self.nbytes if self._kept is not None else 0

    def buffers(self, m: int, fresh: bool) -> tuple:
        """The payload buffers of a call on m rows, shaped for `op` (see `_views`): the kept ones'
        views (cached per m), or new ones (`fresh`, or nothing kept)."""
        if fresh or self._kept is None:
            return self._shape(m, None)
        got = self._views.get(m)
        if got is None:
            if len(self._views) >= MAX_VIEWS:
                del self._views[next(iter(self._views))]
            got = self._views[m] = self._shape(m, self._kept)
        return got

    def _shape(self, m: int, kept: tuple | None) -> tuple:
        n, rb = self.n, self.rb
        chunk, rows = _layout(self.op, n, m)
        # [rows, rb] each (the form gloo and NCCL take: the gathered rows' concatenation)
        flat = tuple((torch.empty((r, rb), dtype=torch.uint8, device=self.device) if kept is None
                      else kept[i][:r * rb].view(r, rb)) for i, r in enumerate(rows))
        if self.op in ("one_shot", "all_gather"):  # (own [m, rb], gathered [n * m, rb], as [n, m, rb])
            return flat[0], flat[1], flat[1].view(n, m, rb)
        if self.op == "two_shot":  # (own [M, rb], its first m rows, received [M, rb], [n, chunk, rb], gathered x2)
            return (flat[0], flat[0][:m], flat[1], flat[1].view(n, chunk, rb), flat[2], flat[2].view(n, chunk, rb))
        return flat[0], flat[1], flat[1].view(n, chunk, rb)  # reduce_scatter


class Kits:
    """One communicator's kits, least recently used first, kept bytes within `budget` (see the
    module docstring)."""

    def __init__(self, n: int, rank: int, budget: int = BUDGET_BYTES, persist: int = PERSIST_BYTES):
        self.n, self.rank, self.budget, self.persist = n, rank, budget, persist
        self._kits: OrderedDict = OrderedDict()
        self.kept_bytes = 0
        self.built = 0  # kits set up so far (a trace of any length builds a handful)

    def get(self, op: str, codec, rows: int, hidden: int, in_dtype: torch.dtype, out_dtype: torch.dtype,
            device: torch.device, stream: int, traced: bool = False) -> Kit:
        if traced:
            return Kit(op, codec, self.n, self.rank, hidden, in_dtype, out_dtype, device, row_bucket(rows), True)
        key = (op, codec, row_bucket(rows), hidden, in_dtype, out_dtype, device, stream)
        kit = self._kits.get(key)
        if kit is not None:
            self._kits.move_to_end(key)
            if kit.kept_bytes == 0 and kit.nbytes <= self.persist:  # released earlier, in use again
                self._keep(kit)
            return kit
        kit = Kit(op, codec, self.n, self.rank, hidden, in_dtype, out_dtype, device, key[2], False)
        self.built += 1
        if len(self._kits) >= MAX_KITS:
            self._release(self._kits.popitem(last=False)[1])
        self._kits[key] = kit
        if kit.nbytes <= self.persist:
            self._keep(kit)
        return kit

    def _keep(self, kit: Kit) -> None:
        """Keep `kit`'s buffers, releasing the least recently used kits' until they fit the budget
        (none, where they cannot fit it at all)."""
        if kit.nbytes > self.budget:
            return
        for old in self._kits.values():  # least recently used first; `kit` is the most recent
            if self.kept_bytes + kit.nbytes <= self.budget:
                break
            self._release(old)
        kit.keep()
        self.kept_bytes += kit.nbytes

    def _release(self, kit: Kit) -> None:
        self.kept_bytes -= kit.kept_bytes
        kit.release()

