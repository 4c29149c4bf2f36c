"""Eager launch plans: each distinct codec operation validated and set up once, then replayed.

A compressed collective calls the same few operations over and over (two per layer, per
forward), with a row count that changes with every prompt. Everything about such a call but its
tensors and its row count is fixed by (codec, operation, row bucket, hidden size, dtype, device,
sources): validation, the codec's constants, device tables, tile choice, index width, the Triton
binary (`launch.Launcher`, launched for the call's rows). A plan holds all of that, memoized on the
codec instance (as its device tables are, `tables.py`), so a call costs a dict lookup, the
output's allocation and the kernel launches, for a prompt length never seen as for one seen
before. The custom ops in `api.py` (for torch.compile) run the same kernels with the same
arguments: the same bytes (tested).

A row bucket (`row_bucket`) is the power of two at or above the row count: the tiles depend on the
rows only through it, and the index width is chosen for its largest count. A plan is keyed on
what it was validated for; a tensor of any other bucket, width, dtype, device, address parity or
source list gets (and caches) a plan of its own, so no stale configuration is reused.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from tpcomp_megatron.codecs.lowrank import LowRankCodec, coordinates, lowrank_sum
from tpcomp_megatron.codecs.outlier import HybridCodec, StaticOutlierCodec

from . import block as _block
from . import outlier as _outlier
from .tables import outlier_tables, source_progression, source_row

Tensor = torch.Tensor
_MEMO_ATTR = "_tpcomp_plans"
MAX_PLANS = 1024
"""Plans kept per codec; past this the memo starts afresh (shapes that vary without bound, e.g. a
test sweeping row counts, must not grow it forever; a model's few shapes never get near)."""


def memo(codec) -> dict:
    """The codec's plan memo (in its `__dict__`: plans live and die with the codec)."""
    attrs = getattr(codec, "__dict__", None)
    if attrs is None:  # not a codec: the plan's validation will say so
        return {}
    plans = attrs.get(_MEMO_ATTR)
    if plans is None or len(plans) >= MAX_PLANS:
        plans = attrs[_MEMO_ATTR] = {}
    return plans


def block_args(codec, hidden: int, device: torch.device) -> tuple:
    """(element, block, scale, data_bytes, slot, first, chan, window_max, slots_off) of a block,
    hybrid or low-rank codec (slots_off: where the outlier slots or the coordinates start;
    window_max: a tuple for the hybrid, () otherwise)."""
    base = codec.block if isinstance(codec, (HybridCodec, LowRankCodec)) else codec
    if isinstance(codec, HybridCodec):
        t = outlier_tables(codec, device)
        tabs = (t.slot, t.first, t.chan, tuple(t.window_max))
    else:
        tabs = (None, None, None, ())
    spec = base.spec
    return (spec.element, spec.block, spec.scale, base.data_bytes(hidden), *tabs, base.row_bytes(hidden))


# -- low-rank helpers (shared with api.py) ------------------------------------------------------
@functools.cache
def bf16_gemm_f32_out() -> bool:
    """Whether `torch.mm(bf16, bf16, out_dtype=torch.float32)` runs on CUDA (torch >= 2.8)."""
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def lowrank_bases(codec: LowRankCodec, sources: Sequence[int], device: torch.device) -> Tensor:
    """The bases of `sources` for `lowrank_sum`: bf16 on the GPU when bf16 holds the coordinates
    exactly and this torch has a bf16 GEMM with float32 output (the same products on tensor
    cores; the codec keeps a bf16 copy of its bases), else float32."""
    bf16 = device.type == "cuda" and codec.coords_exact_in_bf16 and bf16_gemm_f32_out()
    return codec.source_bases(sources, device, torch.bfloat16 if bf16 else torch.float32)


def static_sources(tables, sources: Sequence[int]):
    """(lo, step, first row, row step) of the static outlier codec's payloads: per-payload table
    rows as an arithmetic progression; any other order gets the tables' rows gathered (a
    host-to-device copy, not graph-safe: a plan does it once)."""
    prog = source_progression(sources, tables.sources)
    if prog is not None:
        return tables.lo, tables.step, prog[0], prog[1]
    idx = torch.tensor([source_row(int(s), tables.sources) for s in sources], device=tables.lo.device)
    return tables.lo.index_select(0, idx), tables.step.index_select(0, idx), 0, 1


# -- plans --------------------------------------------------------------------------------------
def _plan(fn: Callable, *launches) -> Callable:
    fn.launches = launches  # the plan's kernel launches (tests check they run direct on CUDA)
    return fn


def _out(shape: tuple, dtype: torch.dtype, device: torch.device, out: Tensor | None) -> Tensor:
    """`out`, checked by the caller when the plan was made for it (`check_out`), or a new tensor."""
    return torch.empty(shape, dtype=dtype, device=device) if out is None else out


def check_out(out: Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A buffer a plan will write into as it is: contiguous, of this shape, dtype and device."""
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {device}; "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")


def encode_plan(codec, rows: int, hidden: int, dtype: torch.dtype, device: torch.device, source: int, *,
                feedback: bool, odd: bool) -> Callable:
    """`plan(x, out[, debt])` -> payload [m, row_bytes] for a validated x [m, hidden] of this dtype,
    m in the row bucket `rows` (`out`: a buffer to write the payload into, or None; `debt`: the
    float32 error-feedback debt, with `feedback`; `odd`: `out` sits at an odd address)."""
    row_bytes = codec.row_bytes(hidden)
    if rows == 0:
        return _plan(lambda x, out, debt=None: _out((0, row_bytes), torch.uint8, device, out))
    if isinstance(codec, StaticOutlierCodec):
        t = outlier_tables(codec, device)
        launch = _outlier.static_encode_launcher(rows, hidden, row_bytes, t.chan.numel(), dtype, device,
                                                 source_row(source, t.sources), not odd)

        def static(x, out, debt=None):
            m = x.shape[0]
            out = _out((m, row_bytes), torch.uint8, device, out)
            launch.run(m, x, out, t.lo, t.inv, t.chan)
            return out
        return _plan(static, launch)
    element, block, scale, data_bytes, slot, first, chan, window_max, slots_off = block_args(codec, hidden, device)
    launch = _block.encode_launcher(rows, hidden, row_bytes, dtype, device, element=element, block=block,
                                    scale=scale, data_bytes=data_bytes, window_max=window_max or None,
                                    slots_off=slots_off, lowrank=isinstance(codec, LowRankCodec), feedback=feedback,
                                    even=not odd)
    if isinstance(codec, LowRankCodec):  # coordinates by one matmul, the rest in the block kernel
        from .api import code_coordinates

        basis = codec.basis(source, device)
        bases = lowrank_bases(codec, [source], device)

        def lowrank(x, out, debt=None):
            m = x.shape[0]
            out = _out((m, row_bytes), torch.uint8, device, out)
            tail, coef = code_coordinates(codec, coordinates(x if debt is None else x.float() + debt, basis))
            low = lowrank_sum(coef[None], bases)
            launch.run(m, x, out, out, out, out, low, out if debt is None else debt)
            out[:, slots_off:] = tail
            return out
        return _plan(lowrank, launch)
    if slot is not None:
        def hybrid(x, out, debt=None):
            m = x.shape[0]
            out = _out((m, row_bytes), torch.uint8, device, out)
            launch.run(m, x, out, slot, first, chan, out, out)
            return out
        return _plan(hybrid, launch)

    def plain(x, out, debt=None):
        m = x.shape[0]
        out = _out((m, row_bytes), torch.uint8, device, out)
        launch.run(m, x, out, out, out, out, out, out if debt is None else debt)
        return out
    return _plan(plain, launch)


def decode_plan(codec, n: int, rows: int, row_bytes: int, hidden: int, dtype: torch.dtype, device: torch.device,
                sources: tuple, mode: str, out_source: int, *, odd: bool) -> Callable:
    """`plan(payloads)` for validated payloads [n, m, row_bytes], m in the row bucket `rows`: mode
    'sum' -> [m, hidden], 'each' -> [n * m, hidden] (both `dtype`), 'encode' -> the requantized
    sum, a payload of source `out_source` (`odd`: the payloads sit at an odd address)."""
    each, encode = mode == "each", mode == "encode"
    out_dtype = torch.uint8 if encode else dtype

    def shape(m: int) -> tuple:
        return (m, row_bytes) if encode else (n * m if each else m, hidden)
    if rows == 0:
        return _plan(lambda p: torch.empty(shape(0), dtype=out_dtype, device=device))
    if isinstance(codec, StaticOutlierCodec):
        t = outlier_tables(codec, device)
        lo, step, start, stride = static_sources(t, sources)  # gathered rows: once, for this plan
        launch = _outlier.static_decode_launcher(n, rows, hidden, row_bytes, t.chan.numel(), lo.shape[0], out_dtype,
                                                 device, tuple(t.window_max), start, stride, each,
                                                 source_row(out_source, t.sources), not odd)

        def static(p):
            m = p.shape[1]
            out = torch.empty(shape(m), dtype=out_dtype, device=device)
            launch.run(m, p, out.view(torch.int16) if out_dtype == torch.bfloat16 else out, lo, step, t.lo, t.inv, t.slot,
                   t.chan, t.first)
            return out
        return _plan(static, launch)
    element, block, scale, data_bytes, slot, first, chan, window_max, slots_off = block_args(codec, hidden, device)
    lowrank = isinstance(codec, LowRankCodec)
    kind = torch.float32 if lowrank and encode else out_dtype  # low-rank: sum in float32, then encode
    launch = _block.decode_launcher(1 if each else n, n * rows if each else rows, hidden, row_bytes, kind, device,
                                    element=element, block=block, scale=scale, data_bytes=data_bytes,
                                    window_max=window_max or None, slots_off=slots_off, encode=encode and not lowrank,
                                    each=each, lowrank=lowrank, even=not odd)
    if lowrank:
        from .api import coordinate_values, encode as encode_payload

        bases = [lowrank_bases(codec, [s], device) for s in sources] if each else lowrank_bases(codec, sources, device)

        def low(p):
            m = p.shape[1]
            coefs = coordinate_values(codec, p, slots_off)
            if each:
                part = torch.cat([lowrank_sum(coefs[i:i + 1], b) for i, b in enumerate(bases)])
                out = torch.empty(shape(m), dtype=out_dtype, device=device)
            else:
                part = lowrank_sum(coefs, bases)
                out = torch.empty((m, hidden), dtype=kind, device=device)
            launch.run(n * m if each else m, p, out.view(torch.int16) if out.dtype == torch.bfloat16 else out, p, p, p, part, p)
            return encode_payload(codec, out, source=out_source) if encode else out
        return _plan(low, launch)
    slot, first, chan = (slot, first, chan) if slot is not None else (None, None, None)

    def block_decode(p):
        m = p.shape[1]
        out = torch.empty(shape(m), dtype=out_dtype, device=device)
        dst = out.view(torch.int16) if out_dtype == torch.bfloat16 else out  # bf16 stored as bits
        rows = n * m if each else m
        if slot is None:
            launch.run(rows, p, dst, p, p, p, p, p)
        else:
            launch.run(rows, p, dst, slot, first, chan, p, p)
        return out
    return _plan(block_decode, launch)



MAX_TABLES = 64
"""Source tables kept per list plan (address sets: a transport's peer slots repeat)."""


def decode_list_plan(codec, n: int, rows: int, row_bytes: int, hidden: int, dtype: torch.dtype,
                     device: torch.device, *, even: bool) -> Callable:
    """`plan(payloads)` for n separate validated payloads [m, row_bytes] (m in the bucket `rows`) of a block or hybrid
    codec (e.g. peers' symmetric-memory slots): their sum [rows, hidden] in `dtype`, read where
    they lie, with no stacked copy. The kernel reads payload i at the lowest payload's address
    plus a byte offset from a device table, built on the first call with each set of addresses
    (a host-to-device copy: warm up before CUDA-graph capture) and kept (`even`: every payload
    sits at an even address)."""
    element, block, scale, data_bytes, slot, first, chan, window_max, slots_off = block_args(codec, hidden, device)
    launch = _block.decode_launcher(n, rows, hidden, row_bytes, dtype, device, element=element, block=block,
                                    scale=scale, data_bytes=data_bytes, window_max=window_max or None,
                                    slots_off=slots_off, encode=False, each=False, lowrank=False, even=even,
                                    table=True)
    tables: dict = {}

    def block_list(payloads: Sequence[Tensor]) -> Tensor:
        m = payloads[0].shape[0]
        out = torch.empty((m, hidden), dtype=dtype, device=device)
        if m == 0:
            return out
        ptrs = tuple(p.data_ptr() for p in payloads)
        got = tables.get(ptrs)
        if got is None:
            lo = min(range(n), key=ptrs.__getitem__)
            offsets = torch.tensor([q - ptrs[lo] for q in ptrs], dtype=torch.int64).to(device)
            if len(tables) >= MAX_TABLES:
                tables.clear()
            got = tables[ptrs] = (lo, offsets)
        lo, offsets = got
        base = payloads[lo]
        dst = out.view(torch.int16) if dtype == torch.bfloat16 else out  # bf16 stored as bits
        if slot is None:
            launch.run(m, base, dst, base, base, base, base, offsets)
        else:
            launch.run(m, base, dst, slot, first, chan, base, offsets)
        return out
    return _plan(block_list, launch)
