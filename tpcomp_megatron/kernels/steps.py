"""Kernel steps: one launch of one kernel, everything but its tensors fixed, in two interchangeable
forms, so that each codec's plan (`plans.py`) is written once for both routes.

* `DIRECT`: a launch prepared for a row bucket (`codecs.base.row_bucket`): a `launch.Launcher`
  (grid columns, scalars, constexprs, and after the first call the compiled binary) launched for
  the call's rows, its output allocated, absent tensors replaced by the kernel's dummies
  (`block.run_encode` ...). Memoized on its plain arguments: the eager plans hold these objects,
  and the custom ops' implementations below look up the very same ones.
* `TRACED`: the custom ops `torch.ops.tpcomp.*`, registered here, whose arguments are plain
  tensors, ints and strings, with fake (meta) implementations, so that torch.compile records them.
  Each implementation is a `DIRECT` step of the same kernel (looked up for the row bucket of its
  tensors): the same launch code, the same bytes.

Both take the same arguments: a factory of the kernel's plain arguments returns
`step(tensors...)`; the `TRACED` factories ignore what only a prepared launch needs (the row
bucket, which is None when traced; dtypes, device and address parity the op reads from its
tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, List, Optional

import torch

from tpcomp_megatron.codecs.base import row_bucket

from . import block as _block
from . import outlier as _outlier

Tensor = torch.Tensor


def _decode_shape(n: int, rows: int, hidden: int, row_bytes: int, mode: str) -> tuple:
    """A decode's output shape: [rows, hidden] (sum), [n * rows, hidden] (each) or a payload
    [rows, row_bytes] (encode)."""
    if mode == "encode":
        return (rows, row_bytes)
    return (n * rows if mode == "each" else rows, hidden)


# -- direct steps: prepared launches ------------------------------------------------------------
@lru_cache(maxsize=4096)
def direct_block_encode(rows: int, hidden: int, row_bytes: int, dtype: torch.dtype, device: torch.device, *,
                        element: str, block: int, scale: str, data_bytes: int, window_max: tuple, slots_off: int,
                        lowrank: bool, feedback: bool, even: bool) -> Callable:
    """`step(x, out, debt, tables, low, tail)` -> the payload [m, row_bytes] of a contiguous x
    [m, hidden] of `dtype`, m in the row bucket `rows`, written into `out` (or a new tensor when
    None): block, hybrid (`tables` (slot, first, chan); `window_max` non-empty) or low-rank
    (`low`, the float32 low-rank part; `tail`, the coordinates' bytes, written at `slots_off`)
    codec, error feedback with `debt` (`even`: `out` sits at an even address). `step(x, out[,
    debt])` is a block codec's whole encode plan (plans.py)."""
    if rows == 0:
        def empty(x, out, debt=None, tables=None, low=None, tail=None):
            return torch.empty((0, row_bytes), dtype=torch.uint8, device=device) if out is None else out
        empty.launches = ()
        return empty
    launch = _block.encode_launcher(rows, hidden, row_bytes, dtype, device, element=element, block=block,
                                    scale=scale, data_bytes=data_bytes, window_max=window_max or None,
                                    slots_off=slots_off, lowrank=lowrank, feedback=feedback, even=even)

    def step(x, out, debt=None, tables=None, low=None, tail=None):
        m = x.shape[0]
        if out is None:
            out = torch.empty((m, row_bytes), dtype=torch.uint8, device=device)
        _block.run_encode(launch, m, x, out, tables, low, debt)
        if tail is not None:
            out[:, slots_off:] = tail
        return out
    step.launches = (launch,)
    return step


@lru_cache(maxsize=4096)
def direct_block_decode(n: int, rows: int, hidden: int, row_bytes: int, out_dtype: torch.dtype,
                        device: torch.device, *, element: str, block: int, scale: str, data_bytes: int,
                        window_max: tuple, slots_off: int, mode: str, lowrank: bool, even: bool) -> Callable:
    """`step(payloads, tables, low, out=None)` -> a new tensor (or `out`, contiguous, of that shape
    and dtype), for contiguous payloads [n, m, row_bytes], m in
    the row bucket `rows`: mode 'sum' -> [m, hidden], 'each' -> [n * m, hidden] (`out_dtype`),
    'encode' -> the requantized sum [m, row_bytes] (`out_dtype` uint8; not low-rank). `tables`:
    the hybrid's (slot, first, chan); `low`: the low-rank part, float32 [m, hidden] for 'sum',
    [n * m, hidden] for 'each' (`even`: the payloads sit at an even address). `step(payloads)` is
    a block codec's whole decode plan (plans.py)."""
    each = mode == "each"
    if rows == 0:
        def empty(p, tables=None, low=None, out=None):
            return torch.empty(_decode_shape(n, 0, hidden, row_bytes, mode), dtype=out_dtype, device=device)
        empty.launches = ()
        return empty
    # 'each': no sources to tell apart, one payload of n * rows rows
    launch = _block.decode_launcher(1 if each else n, n * rows if each else rows, hidden, row_bytes, out_dtype, device,
                                    element=element, block=block, scale=scale, data_bytes=data_bytes,
                                    window_max=window_max or None, slots_off=slots_off, encode=mode == "encode",
                                    each=each, lowrank=lowrank, even=even)

    def step(p, tables=None, low=None, out=None):
        m = p.shape[1]
        if out is None:
            out = torch.empty(_decode_shape(n, m, hidden, row_bytes, mode), dtype=out_dtype, device=device)
        _block.run_decode(launch, n * m if each else m, p, out, tables, low)
        return out
    step.launches = (launch,)
    return step


@lru_cache(maxsize=4096)
def direct_static_encode(rows: int, hidden: int, row_bytes: int, k: int, dtype: torch.dtype, device: torch.device,
                         src_row: int, even: bool) -> Callable:
    """`step(x, out, lo, inv, chan)` -> the static outlier codec's payload [m, row_bytes] of x
    [m, hidden], m in the row bucket `rows`, table row `src_row` (into `out`, or a new tensor)."""
    if rows == 0:
        def empty(x, out, lo, inv, chan):
            return torch.empty((0, row_bytes), dtype=torch.uint8, device=device) if out is None else out
        empty.launches = ()
        return empty
    launch = _outlier.static_encode_launcher(rows, hidden, row_bytes, k, dtype, device, src_row, even)

    def step(x, out, lo, inv, chan):
        m = x.shape[0]
        if out is None:
            out = torch.empty((m, row_bytes), dtype=torch.uint8, device=device)
        _outlier.run_static_encode(launch, m, x, out, lo, inv, chan)
        return out
    step.launches = (launch,)
    return step


@lru_cache(maxsize=4096)
def direct_static_decode(n: int, rows: int, hidden: int, row_bytes: int, k: int, sources: int, out_dtype: torch.dtype,
                         device: torch.device, window_max: tuple, src_start: int, src_step: int, mode: str,
                         out_row: int, even: bool) -> Callable:
    """`step(payloads, lo, step, lo_out, inv, slot, chan, first, out=None)` -> a new tensor (or `out`), the static
    outlier codec's decode of payloads [n, m, row_bytes] (m in the row bucket `rows`; payload i
    uses table row `src_start + i * src_step` of `lo` / `step`, which have `sources` rows; mode as
    `direct_block_decode`, 'encode' to table row `out_row`)."""
    each = mode == "each"
    if rows == 0:
        def empty(p, lo, step, lo_out, inv, slot, chan, first, out=None):
            return torch.empty(_decode_shape(n, 0, hidden, row_bytes, mode), dtype=out_dtype, device=device)
        empty.launches = ()
        return empty
    launch = _outlier.static_decode_launcher(n, rows, hidden, row_bytes, k, sources, out_dtype, device, window_max,
                                             src_start, src_step, each, out_row, even)

    def step(p, lo, step_, lo_out, inv, slot, chan, first, out=None):
        m = p.shape[1]
        if out is None:
            out = torch.empty(_decode_shape(n, m, hidden, row_bytes, mode), dtype=out_dtype, device=device)
        _outlier.run_static_decode(launch, m, p, out, lo, step_, lo_out, inv, slot, chan, first)
        return out
    step.launches = (launch,)
    return step


# -- custom ops (torch.compile): each implementation a direct step -----------------------------
def _decode_out(payloads: Tensor, hidden: int, mode: str, dtype: torch.dtype) -> Tensor:
    """The (uninitialized) output of a decode op: [rows, hidden] (sum), [n * rows, hidden]
    (each), a payload [rows, row_bytes] (encode)."""
    if mode not in ("sum", "each", "encode"):
        raise ValueError(f"unknown decode mode {mode!r}; valid: ['sum', 'each', 'encode']")
    n, rows, row_bytes = payloads.shape
    return payloads.new_empty(_decode_shape(n, rows, hidden, row_bytes, mode),
                              dtype=torch.uint8 if mode == "encode" else dtype)


def _tables(slot, first, chan):
    return None if slot is None else (slot, first, chan)


@torch.library.custom_op("tpcomp::block_encode", mutates_args=())
def block_encode(x: Tensor, element: str, block: int, scale: str, data_bytes: int, slot: Optional[Tensor],
                 first: Optional[Tensor], chan: Optional[Tensor], window_max: List[int], slots_off: int,
                 row_bytes: int, lowrank: Optional[Tensor] = None, tail: Optional[Tensor] = None) -> Tensor:
    """Block codec, or hybrid when the outlier tables (slot, first, chan, window_max) are given,
    or low-rank when the low-rank part (float32 [rows, hidden]) and the coordinates' bytes
    (`tail`, stored at `slots_off`) are."""
    rows, hidden = x.shape
    _block.check_lowrank(lowrank, rows, hidden)
    step = direct_block_encode(row_bucket(rows), hidden, row_bytes, x.dtype, x.device, element=element, block=block,
                               scale=scale, data_bytes=data_bytes, window_max=tuple(window_max), slots_off=slots_off,
                               lowrank=lowrank is not None, feedback=False, even=True)
    return step(x, None, None, _tables(slot, first, chan), lowrank, tail)


@block_encode.register_fake
def _(x, element, block, scale, data_bytes, slot, first, chan, window_max, slots_off, row_bytes, lowrank=None,
      tail=None):
    return x.new_empty((x.shape[0], row_bytes), dtype=torch.uint8)


@torch.library.custom_op("tpcomp::block_encode_feedback", mutates_args=("debt",))
def block_encode_feedback(x: Tensor, debt: Tensor, element: str, block: int, scale: str, data_bytes: int,
                          slots_off: int, row_bytes: int, lowrank: Optional[Tensor] = None,
                          tail: Optional[Tensor] = None) -> Tensor:
    """Block or low-rank encode of x + debt (error feedback); `debt` becomes x + debt minus what
    the payload decodes to, in the same pass."""
    rows, hidden = x.shape
    if debt.dtype != torch.float32 or debt.shape != x.shape or not debt.is_contiguous():
        raise ValueError("error-feedback encode: a contiguous float32 debt of the input's shape")
    _block.check_lowrank(lowrank, rows, hidden)
    step = direct_block_encode(row_bucket(rows), hidden, row_bytes, x.dtype, x.device, element=element, block=block,
                               scale=scale, data_bytes=data_bytes, window_max=(), slots_off=slots_off,
                               lowrank=lowrank is not None, feedback=True, even=True)
    return step(x, None, debt, None, lowrank, tail)


@block_encode_feedback.register_fake
def _(x, debt, element, block, scale, data_bytes, slots_off, row_bytes, lowrank=None, tail=None):
    return x.new_empty((x.shape[0], row_bytes), dtype=torch.uint8)


@torch.library.custom_op("tpcomp::block_decode", mutates_args=())
def block_decode(payloads: Tensor, hidden: int, element: str, block: int, scale: str, data_bytes: int,
                 slot: Optional[Tensor], first: Optional[Tensor], chan: Optional[Tensor], window_max: List[int],
                 slots_off: int, mode: str, dtype: torch.dtype, lowrank: Optional[Tensor] = None) -> Tensor:
    """mode 'sum' -> [rows, hidden], 'each' -> [n * rows, hidden], 'encode' -> payload.
    `lowrank`: the low-rank part of low-rank payloads, float32, [rows, hidden] for 'sum' (all
    sources together), [n * rows, hidden] for 'each'."""
    n, rows, row_bytes = payloads.shape
    _decode_out(payloads, hidden, mode, dtype)  # checks the mode
    if lowrank is not None and mode == "encode":
        raise ValueError("low-rank decode: no requantization in the kernel")
    _block.check_lowrank(lowrank, n * rows if mode == "each" else rows, hidden)
    step = direct_block_decode(n, row_bucket(rows), hidden, row_bytes, torch.uint8 if mode == "encode" else dtype,
                               payloads.device, element=element, block=block, scale=scale, data_bytes=data_bytes,
                               window_max=tuple(window_max), slots_off=slots_off, mode=mode,
                               lowrank=lowrank is not None, even=payloads.data_ptr() % 2 == 0)
    return step(payloads, _tables(slot, first, chan), lowrank)


@block_decode.register_fake
def _(payloads, hidden, element, block, scale, data_bytes, slot, first, chan, window_max, slots_off, mode, dtype,
      lowrank=None):
    return _decode_out(payloads, hidden, mode, dtype)


@torch.library.custom_op("tpcomp::static_encode", mutates_args=())
def static_encode(x: Tensor, lo: Tensor, inv: Tensor, chan: Tensor, src_row: int) -> Tensor:
    rows, hidden = x.shape
    k = chan.numel()
    step = direct_static_encode(row_bucket(rows), hidden, hidden // 2 + 2 * k, k, x.dtype, x.device, src_row, True)
    return step(x, None, lo, inv, chan)


@static_encode.register_fake
def _(x, lo, inv, chan, src_row):
    return x.new_empty((x.shape[0], x.shape[1] // 2 + 2 * chan.numel()), dtype=torch.uint8)


@torch.library.custom_op("tpcomp::static_decode", mutates_args=())
def static_decode(payloads: Tensor, hidden: int, lo: Tensor, step: Tensor, lo_out: Tensor, inv: Tensor, slot: Tensor,
                  chan: Tensor, first: Tensor, window_max: List[int], src_start: int, src_step: int, mode: str,
                  out_row: int, dtype: torch.dtype) -> Tensor:
    """mode 'sum' -> [rows, hidden], 'each' -> [n * rows, hidden], 'encode' -> payload."""
    n, rows, row_bytes = payloads.shape
    _decode_out(payloads, hidden, mode, dtype)  # checks the mode
    kernel = direct_static_decode(n, row_bucket(rows), hidden, row_bytes, chan.numel(), lo.shape[0],
                                  torch.uint8 if mode == "encode" else dtype, payloads.device, tuple(window_max),
                                  src_start, src_step, mode, out_row, payloads.data_ptr() % 2 == 0)
    return kernel(payloads, lo, step, lo_out, inv, slot, chan, first)


@static_decode.register_fake
def _(payloads, hidden, lo, step, lo_out, inv, slot, chan, first, window_max, src_start, src_step, mode, out_row,
      dtype):
    return _decode_out(payloads, hidden, mode, dtype)


# -- traced steps: the custom ops, with the direct steps' arguments ----------------------------
def _with_out(payload: Tensor, out: Tensor | None) -> Tensor:
    return payload if out is None else out.copy_(payload)


def traced_block_encode(rows, hidden: int, row_bytes: int, dtype, device, *, element: str, block: int, scale: str,
                        data_bytes: int, window_max: tuple, slots_off: int, lowrank: bool, feedback: bool,
                        even: bool) -> Callable:
    """`direct_block_encode`'s step through `tpcomp::block_encode` (`..._feedback` with a debt)."""
    def step(x, out, debt=None, tables=None, low=None, tail=None):
        if debt is not None:
            return _with_out(torch.ops.tpcomp.block_encode_feedback(x, debt, element, block, scale, data_bytes,
                                                                    slots_off, row_bytes, low, tail), out)
        slot, first, chan = (None, None, None) if tables is None else tables
        return _with_out(torch.ops.tpcomp.block_encode(x, element, block, scale, data_bytes, slot, first, chan,
                                                       list(window_max), slots_off, row_bytes, low, tail), out)
    return step


def _into(out: Tensor | None, result: Tensor) -> Tensor:
    """`result`, or (a traced op allocates its own) copied into `out` when one is given."""
    return result if out is None else out.copy_(result)


def traced_block_decode(n: int, rows, hidden: int, row_bytes: int, out_dtype: torch.dtype, device, *, element: str,
                        block: int, scale: str, data_bytes: int, window_max: tuple, slots_off: int, mode: str,
                        lowrank: bool, even: bool) -> Callable:
    """`direct_block_decode`'s step through `tpcomp::block_decode`."""
    def step(p, tables=None, low=None, out=None):
        slot, first, chan = (None, None, None) if tables is None else tables
        return _into(out, torch.ops.tpcomp.block_decode(p, hidden, element, block, scale, data_bytes, slot, first,
                                                        chan, list(window_max), slots_off, mode, out_dtype, low))
    return step


def traced_static_encode(rows, hidden: int, row_bytes: int, k: int, dtype, device, src_row: int,
                         even: bool) -> Callable:
    """`direct_static_encode`'s step through `tpcomp::static_encode`."""
    def step(x, out, lo, inv, chan):
        return _with_out(torch.ops.tpcomp.static_encode(x, lo, inv, chan, src_row), out)
    return step


def traced_static_decode(n: int, rows, hidden: int, row_bytes: int, k: int, sources: int, out_dtype: torch.dtype,
                         device, window_max: tuple, src_start: int, src_step: int, mode: str, out_row: int,
                         even: bool) -> Callable:
    """`direct_static_decode`'s step through `tpcomp::static_decode`."""
    def step(p, lo, step_, lo_out, inv, slot, chan, first, out=None):
        return _into(out, torch.ops.tpcomp.static_decode(p, hidden, lo, step_, lo_out, inv, slot, chan, first,
                                                         list(window_max), src_start, src_step, mode, out_row,
                                                         out_dtype))
    return step


@dataclass(frozen=True)
class Steps:
    """The kernel steps a plan is built from (`plans.py`): prepared launches or the custom ops."""
    block_encode: Callable
    block_decode: Callable
    static_encode: Callable
    static_decode: Callable
    direct: bool  # prepared launches (eager), or the custom ops (traced: built per trace, kept nowhere)


DIRECT = Steps(direct_block_encode, direct_block_decode, direct_static_encode, direct_static_decode, True)
TRACED = Steps(traced_block_encode, traced_block_decode, traced_static_encode, traced_static_decode, False)
