"""Per-codec kernel plans: each codec operation set up once, then run again and again; the one
route of eager calls and torch.compile alike.

A compressed collective calls the same few operations over and over (two per layer, per
forward), with a row count that changes with every prompt. Everything about such a call but its
tensors and its row count is fixed by (codec, operation, row bucket, hidden size, dtype, device,
sources): the codec's constants, device tables, low-rank bases, tile choice, index width, the
Triton binary. A plan holds all of that and, per call, runs the codec's torch steps (low-rank
coordinates and GEMMs) and its kernel steps (`steps.py`) for the call's rows.

The plan of an operation is built by one function per operation (`encode_plan`, `decode_plan`)
from one of two sets of kernel steps with the same interface:

* `steps.DIRECT` (eager calls): prepared launches (`launch.Launcher`); `api.py` validates the
  call and memoizes the plan on the codec instance (`memo`: plans live and die with the codec, as
  its device tables do, `tables.py`), so a call costs a dict lookup, the output's allocation and
  the kernel launches, for a prompt length never seen as for one seen before.
* `steps.TRACED` (under torch.compile): the custom ops `torch.ops.tpcomp.*`, whose
  implementations are the `DIRECT` steps of the same launches; the plan is built per trace and
  kept nowhere (torch.compile records what it calls).

A row bucket (`codecs.base.row_bucket`) is the power of two at or above the row count: the tiles
depend on the rows only through it, and the index width is chosen for its largest count. A plan
is keyed on what it was validated for (`api.py`); a tensor of any other bucket, width, dtype,
device, address parity or source list gets (and caches) a plan of its own, so no stale
configuration is reused. A traced plan has no bucket (None): the custom ops read the rows from
their tensors.

Imports only lower modules (`steps`, `block`, `tables`, the codecs); `api.py` is the front that
validates and dispatches to these plans.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from tpcomp_megatron.codecs.lowrank import LowRankCodec, coordinates, lowrank_sum
from tpcomp_megatron.codecs.outlier import HybridCodec, StaticOutlierCodec

from . import block as _block
from .steps import DIRECT, Steps
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


# -- low-rank helpers ---------------------------------------------------------------------------
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


def _coordinate_coder(codec: LowRankCodec, rows, device: torch.device, steps: Steps) -> Callable:
    """`code(coef)` -> (the bytes of bf16 coordinates [m, K] in the payload, the float32 values
    the decoder reads back): `LowRankCodec.code_coordinates`, coded coordinates through their
    block codec's plans (m in the row bucket `rows`)."""
    if codec.coords is None:  # bf16 coordinates: plain tensor ops, any device
        return codec.code_coordinates
    coords, k = codec.coords, codec.spec.rank
    why = coords.ineligible(k)
    if why:
        raise ValueError(f"{codec.spec}: coordinates: {why}")
    encode = encode_plan(coords, rows, k, torch.bfloat16, device, 0, feedback=False, odd=False, steps=steps)
    decode = decode_plan(coords, 1, rows, coords.row_bytes(k), k, torch.float32, device, (0,), "each", 0, odd=False,
                         steps=steps)

    def code(coef: Tensor) -> tuple[Tensor, Tensor]:
        tail = encode(coef.contiguous(), None)
        return tail, decode(tail.unsqueeze(0))
    return _plan(code, steps, encode, decode)


def _coordinate_reader(codec: LowRankCodec, n: int, rows, slots_off: int, device: torch.device,
                       steps: Steps) -> Callable:
    """`read(payloads)` -> the coordinates of payloads [n, m, row_bytes] (their tails), float32
    [n, m, K] (m in the row bucket `rows`)."""
    if codec.coords is None:  # bf16 coordinates: plain tensor ops, any device
        return lambda p: codec.coordinate_values(p[:, :, slots_off:].contiguous())
    coords, k = codec.coords, codec.spec.rank
    decode = decode_plan(coords, 1, None if rows is None else n * rows, coords.row_bytes(k), k, torch.float32, device,
                         (0,), "each", 0, odd=False, steps=steps)

    def read(p: Tensor) -> Tensor:
        m = p.shape[1]
        tails = p[:, :, slots_off:].contiguous()
        return decode(tails.view(1, n * m, -1)).view(n, m, k)
    return _plan(read, steps, decode)


# -- plans --------------------------------------------------------------------------------------
def _plan(fn: Callable, steps: Steps, *parts) -> Callable:
    """`fn`, with (direct plans) `launches`: the kernel launches of its steps and nested plans
    (tests check they run straight through the compiled binary on CUDA)."""
    if steps.direct:
        fn.launches = tuple(launch for part in parts if part is not None
                            for launch in getattr(part, "launches", ()))
    return fn


def encode_plan(codec, rows: int | None, hidden: int, dtype: torch.dtype, device: torch.device, source: int, *,
                feedback: bool, odd: bool, steps: Steps = DIRECT) -> Callable:
    """`plan(x, out[, debt])` -> payload [m, row_bytes] for a validated contiguous x [m, hidden] of
    this dtype, m in the row bucket `rows` (None: traced), written into `out` (or a new tensor when
    None); `debt`: the float32 error-feedback debt, with `feedback`; `odd`: `out` sits at an odd
    address."""
    row_bytes = codec.row_bytes(hidden)
    if rows == 0:
        return _plan(lambda x, out, debt=None: torch.empty((0, row_bytes), dtype=torch.uint8, device=device)
                     if out is None else out, steps)
    if isinstance(codec, StaticOutlierCodec):
        t = outlier_tables(codec, device)
        step = steps.static_encode(rows, hidden, row_bytes, t.chan.numel(), dtype, device,
                                   source_row(source, t.sources), not odd)

        def static(x, out, debt=None):
            return step(x, out, t.lo, t.inv, t.chan)
        return _plan(static, steps, step)
    element, block, scale, data_bytes, slot, first, chan, window_max, slots_off = block_args(codec, hidden, device)
    lowrank = isinstance(codec, LowRankCodec)
    step = steps.block_encode(rows, hidden, row_bytes, dtype, device, element=element, block=block, scale=scale,
                              data_bytes=data_bytes, window_max=window_max, slots_off=slots_off, lowrank=lowrank,
                              feedback=feedback, even=not odd)
    if lowrank:  # coordinates by one matmul, the low-rank part by one GEMM, the rest in the block kernel
        basis = codec.basis(source, device)
        bases = lowrank_bases(codec, [source], device)
        code = _coordinate_coder(codec, rows, device, steps)

        def low(x, out, debt=None):
            tail, coef = code(coordinates(x if debt is None else x.float() + debt, basis))
            return step(x, out, debt, None, lowrank_sum(coef[None], bases), tail)
        return _plan(low, steps, step, code)
    # a block codec's step is its plan, a hybrid's with its tables bound (no frame of their own)
    if slot is not None:
        return _plan(functools.partial(step, tables=(slot, first, chan)), steps, step)
    return _plan(step, steps, step)


def decode_plan(codec, n: int, rows: int | None, row_bytes: int, hidden: int, dtype: torch.dtype, device: torch.device,
                sources: tuple, mode: str, out_source: int, *, odd: bool, steps: Steps = DIRECT) -> Callable:
    """`plan(payloads, out=None)` for validated contiguous payloads [n, m, row_bytes], m in the row
    bucket `rows` (None: traced): mode 'sum' -> [m, hidden], 'each' -> [n * m, hidden] (both
    `dtype`), 'encode' -> the requantized sum, a payload of source `out_source`; a new tensor, or
    `out` (contiguous, that shape and dtype) written (`odd`: the payloads sit at an odd address)."""
    each, encode = mode == "each", mode == "encode"
    out_dtype = torch.uint8 if encode else dtype
    if rows == 0:
        shape = (0, row_bytes) if encode else (0, hidden)
        return _plan(lambda p, out=None: torch.empty(shape, dtype=out_dtype, device=device) if out is None else out,
                     steps)
    if isinstance(codec, StaticOutlierCodec):
        t = outlier_tables(codec, device)
        lo, step, start, stride = static_sources(t, sources)  # gathered rows: once, for this plan
        kernel = steps.static_decode(n, rows, hidden, row_bytes, t.chan.numel(), lo.shape[0], out_dtype, device,
                                     tuple(t.window_max), start, stride, mode, source_row(out_source, t.sources),
                                     not odd)

        def static(p, out=None):
            return kernel(p, lo, step, t.lo, t.inv, t.slot, t.chan, t.first, out=out)
        return _plan(static, steps, kernel)
    element, block, scale, data_bytes, slot, first, chan, window_max, slots_off = block_args(codec, hidden, device)
    if isinstance(codec, LowRankCodec):
        # The low-rank parts come from one GEMM over every source's coordinates (one per payload
        # for 'each'), which the block kernel adds to the block parts; a requantized sum needs the
        # full rows' coordinates first, so 'encode' is a decode in float32 and an encode.
        kernel = steps.block_decode(n, rows, hidden, row_bytes, torch.float32 if encode else dtype, device,
                                    element=element, block=block, scale=scale, data_bytes=data_bytes,
                                    window_max=window_max, slots_off=slots_off, mode="each" if each else "sum",
                                    lowrank=True, even=not odd)
        read = _coordinate_reader(codec, n, rows, slots_off, device, steps)
        bases = [lowrank_bases(codec, [s], device) for s in sources] if each else lowrank_bases(codec, sources, device)
        requantize = (encode_plan(codec, rows, hidden, torch.float32, device, out_source, feedback=False, odd=False,
                                  steps=steps) if encode else None)

        def low(p, out=None):
            coefs = read(p)
            if each:
                part = torch.cat([lowrank_sum(coefs[i:i + 1], b) for i, b in enumerate(bases)])
            else:
                part = lowrank_sum(coefs, bases)
            if requantize is None:
                return kernel(p, None, part, out=out)
            return requantize(kernel(p, None, part), out)
        return _plan(low, steps, kernel, read, requantize)
    kernel = steps.block_decode(n, rows, hidden, row_bytes, out_dtype, device, element=element, block=block,
                                scale=scale, data_bytes=data_bytes, window_max=window_max, slots_off=slots_off,
                                mode=mode, lowrank=False, even=not odd)
    if slot is not None:
        return _plan(functools.partial(kernel, tables=(slot, first, chan)), steps, kernel)
    return _plan(kernel, steps, kernel)


MAX_TABLES = 64
"""Source tables kept per list plan (address sets: a transport's peer slots repeat)."""


def decode_list_plan(codec, n: int, rows: int, row_bytes: int, hidden: int, dtype: torch.dtype,
                     device: torch.device, *, even: bool) -> Callable:
    """`plan(payloads)` for n separate validated payloads [m, row_bytes] (m in the bucket `rows`) of
    a block or hybrid codec (e.g. peers' symmetric-memory slots): their sum [m, hidden] in `dtype`,
    read where they lie, with no stacked copy (eager only; traced, they are stacked). The kernel
    reads payload i at the lowest payload's address plus a byte offset from a device table, built
    on the first call with each set of addresses (a host-to-device copy: warm up before CUDA-graph
    capture) and kept (`even`: every payload sits at an even address)."""
    element, block, scale, data_bytes, slot, first, chan, window_max, slots_off = block_args(codec, hidden, device)
    launch = _block.decode_launcher(n, rows, hidden, row_bytes, dtype, device, element=element, block=block,
                                    scale=scale, data_bytes=data_bytes, window_max=window_max or None,
                                    slots_off=slots_off, encode=False, each=False, lowrank=False, even=even,
                                    table=True)
    tables = (slot, first, chan) if slot is not None else None
    offsets_by_ptrs: dict = {}

    def block_list(payloads: Sequence[Tensor]) -> Tensor:
        m = payloads[0].shape[0]
        out = torch.empty((m, hidden), dtype=dtype, device=device)
        if m == 0:
            return out
        ptrs = tuple(p.data_ptr() for p in payloads)
        got = offsets_by_ptrs.get(ptrs)
        if got is None:
            lo = min(range(n), key=ptrs.__getitem__)
            offsets = torch.tensor([q - ptrs[lo] for q in ptrs], dtype=torch.int64).to(device)
            if len(offsets_by_ptrs) >= MAX_TABLES:
                offsets_by_ptrs.clear()
            got = offsets_by_ptrs[ptrs] = (lo, offsets)
        lo, offsets = got
        _block.run_decode(launch, m, payloads[lo], out, tables, None, offsets)
        return out
    block_list.launches = (launch,)
    return block_list
