"""Public kernel API: the codec operations of `tpcomp_megatron.ops`, eager and as custom ops.

`encode`, `encode_feedback`, `decode_sum`, `decode_sum_encode` and `decode_each` take a codec
object and validate their inputs. Eager calls replay a launch plan (`plans.py`: validated and set
up once per codec, shape, dtype and device, then launched without the custom-op dispatcher, whose
Python layer cost more host time than the kernels). Under torch.compile the same kernels run
through ops in the `tpcomp` namespace (`torch.ops.tpcomp.*`) whose arguments are plain tensors,
ints and strings, with fake (meta) implementations, so the calls trace. Both produce the same
bytes as the codec's PyTorch reference, and both replay inside CUDA graphs.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from triton.runtime.interpreter import InterpretedFunction

from tpcomp_megatron.codecs.base import SUPPORTED_DTYPES, Codec, row_bucket
from tpcomp_megatron.codecs.block import BlockCodec
from tpcomp_megatron.codecs.lowrank import LowRankCodec, coordinates, lowrank_sum
from tpcomp_megatron.codecs.outlier import HybridCodec, StaticOutlierCodec

from . import block as _block
from . import outlier as _outlier
from .plans import (block_args, check_out, decode_list_plan, decode_plan, encode_plan, lowrank_bases, memo,
                    static_sources)
from .tables import outlier_tables, source_row

Tensor = torch.Tensor
SUPPORTED_CODECS = (BlockCodec, StaticOutlierCodec, HybridCodec, LowRankCodec)
# Kernels built while TRITON_INTERPRET=1 was set run on CPU tensors (tests); compiled ones need CUDA.
INTERPRETED = isinstance(_block._block_encode_kernel, InterpretedFunction)


# -- custom ops -------------------------------------------------------------------------------
@torch.library.custom_op("tpcomp::block_encode", mutates_args=())
def block_encode(x: Tensor, element: str, block: int, scale: str, data_bytes: int, slot: Optional[Tensor],
                 first: Optional[Tensor], chan: Optional[Tensor], window_max: List[int], slots_off: int,
                 row_bytes: int, lowrank: Optional[Tensor] = None, tail: Optional[Tensor] = None) -> Tensor:
    """Block codec, or hybrid when the outlier tables (slot, first, chan, window_max) are given,
    or low-rank when the low-rank part (float32 [rows, hidden]) and the coordinates' bytes
    (`tail`, stored at `slots_off`) are."""
    out = torch.empty(x.shape[0], row_bytes, dtype=torch.uint8, device=x.device)
    _block.launch_block_encode(x, out, element=element, block=block, scale=scale, data_bytes=data_bytes,
                               outliers=_outliers(slot, first, chan, window_max), slots_off=slots_off,
                               lowrank=lowrank)
    if lowrank is not None:
        out[:, slots_off:] = tail
    return out


@torch.library.custom_op("tpcomp::block_encode_feedback", mutates_args=("debt",))
def block_encode_feedback(x: Tensor, debt: Tensor, element: str, block: int, scale: str, data_bytes: int,
                          slots_off: int, row_bytes: int, lowrank: Optional[Tensor] = None,
                          tail: Optional[Tensor] = None) -> Tensor:
    """Block or low-rank encode of x + debt (error feedback); `debt` becomes x + debt minus what
    the payload decodes to, in the same pass."""
    out = torch.empty(x.shape[0], row_bytes, dtype=torch.uint8, device=x.device)
    _block.launch_block_encode(x, out, element=element, block=block, scale=scale, data_bytes=data_bytes,
                               outliers=None, slots_off=slots_off, lowrank=lowrank, debt=debt)
    if lowrank is not None:
        out[:, slots_off:] = tail
    return out


@block_encode_feedback.register_fake
def _(x, debt, element, block, scale, data_bytes, slots_off, row_bytes, lowrank=None, tail=None):
    return x.new_empty((x.shape[0], row_bytes), dtype=torch.uint8)


def _outliers(slot, first, chan, window_max):
    return None if slot is None else (slot, first, chan, tuple(window_max))


@block_encode.register_fake
def _(x, element, block, scale, data_bytes, slot, first, chan, window_max, slots_off, row_bytes, lowrank=None,
      tail=None):
    return x.new_empty((x.shape[0], row_bytes), dtype=torch.uint8)


@torch.library.custom_op("tpcomp::block_decode", mutates_args=())
def block_decode(payloads: Tensor, hidden: int, element: str, block: int, scale: str, data_bytes: int,
                 slot: Optional[Tensor], first: Optional[Tensor], chan: Optional[Tensor], window_max: List[int],
                 slots_off: int, mode: str, dtype: torch.dtype, lowrank: Optional[Tensor] = None) -> Tensor:
    """mode 'sum' -> [rows, hidden], 'each' -> [n * rows, hidden], 'encode' -> payload.
    `lowrank`: the low-rank part of low-rank payloads, float32, [rows, hidden] for 'sum' (all
    sources together), [n * rows, hidden] for 'each'."""
    n, rows, row_bytes = payloads.shape
    out = _decode_out(payloads, hidden, mode, dtype)
    if mode == "each":  # no sources to tell apart: decode one payload of n * rows rows
        payloads = payloads.view(1, n * rows, row_bytes)
    _block.launch_block_decode(payloads, out, hidden=hidden, element=element, block=block, scale=scale,
                               data_bytes=data_bytes, outliers=_outliers(slot, first, chan, window_max),
                               slots_off=slots_off, encode=mode == "encode", each=mode == "each", lowrank=lowrank)
    return out


@block_decode.register_fake
def _(payloads, hidden, element, block, scale, data_bytes, slot, first, chan, window_max, slots_off, mode, dtype,
      lowrank=None):
    return _decode_out(payloads, hidden, mode, dtype)


_MODES = ("sum", "each", "encode")


def _decode_out(payloads: Tensor, hidden: int, mode: str, dtype: torch.dtype) -> Tensor:
    """The (uninitialized) output of a decode op, real or fake: [rows, hidden] (sum),
    [n * rows, hidden] (each), a payload [rows, row_bytes] (encode)."""
    if mode not in _MODES:
        raise ValueError(f"unknown decode mode {mode!r}; valid: {list(_MODES)}")
    n, rows, row_bytes = payloads.shape
    if mode == "encode":
        return payloads.new_empty((rows, row_bytes), dtype=torch.uint8)
    return payloads.new_empty((n * rows if mode == "each" else rows, hidden), dtype=dtype)


@torch.library.custom_op("tpcomp::static_encode", mutates_args=())
def static_encode(x: Tensor, lo: Tensor, inv: Tensor, chan: Tensor, src_row: int) -> Tensor:
    out = torch.empty(x.shape[0], x.shape[1] // 2 + 2 * chan.numel(), dtype=torch.uint8, device=x.device)
    _outlier.launch_static_encode(x, out, lo=lo, inv=inv, chan=chan, src_row=src_row)
    return out


@static_encode.register_fake
def _(x, lo, inv, chan, src_row):
    return x.new_empty((x.shape[0], x.shape[1] // 2 + 2 * chan.numel()), dtype=torch.uint8)


@torch.library.custom_op("tpcomp::static_decode", mutates_args=())
def static_decode(payloads: Tensor, hidden: int, lo: Tensor, step: Tensor, lo_out: Tensor, inv: Tensor, slot: Tensor,
                  chan: Tensor, first: Tensor, window_max: List[int], src_start: int, src_step: int, mode: str, out_row: int,
                  dtype: torch.dtype) -> Tensor:
    """mode 'sum' -> [rows, hidden], 'each' -> [n * rows, hidden], 'encode' -> payload."""
    out = _decode_out(payloads, hidden, mode, dtype)
    _outlier.launch_static_decode(payloads, out, hidden=hidden, lo=lo, step=step, lo_out=lo_out, inv=inv, slot=slot,
                                  chan=chan, first=first, window_max=tuple(window_max),
                                  src_start=src_start, src_step=src_step, each=mode == "each", out_row=out_row)
    return out


@static_decode.register_fake
def _(payloads, hidden, lo, step, lo_out, inv, slot, chan, first, window_max, src_start, src_step, mode, out_row,
      dtype):
    return _decode_out(payloads, hidden, mode, dtype)


# -- public API -------------------------------------------------------------------------------
def _check_codec(codec: Codec) -> None:
    if not isinstance(codec, SUPPORTED_CODECS):
        raise ValueError(f"no fused kernels for codec {type(codec).__name__}; supported: "
                         f"{[c.__name__ for c in SUPPORTED_CODECS]} (use the codec's reference methods)")


def _check_device(t: Tensor) -> None:
    if INTERPRETED == t.is_cuda:
        need = "CPU tensors (the kernels were built with TRITON_INTERPRET=1)" if INTERPRETED else "CUDA tensors"
        raise ValueError(f"tpcomp kernels take {need}; got a tensor on {t.device}")


def _check_payloads(codec: Codec, payloads: Tensor, hidden: int, sources: Sequence[int]) -> Tensor:
    _check_codec(codec)
    _check_device(payloads)
    why = codec.ineligible(hidden)
    if why:
        raise ValueError(f"{codec.spec}: {why}")
    if payloads.dtype != torch.uint8 or payloads.dim() != 3:
        raise ValueError(f"payloads must be uint8 [n, rows, row_bytes]; got {payloads.dtype} {tuple(payloads.shape)}")
    if payloads.shape[0] < 1 or payloads.shape[2] != codec.row_bytes(hidden):
        raise ValueError(f"{codec.spec}: payloads {tuple(payloads.shape)} do not hold rows of {hidden} values "
                         f"(expected [n >= 1, rows, {codec.row_bytes(hidden)}])")
    if len(sources) != payloads.shape[0]:
        raise ValueError(f"{len(sources)} sources given for {payloads.shape[0]} payloads")
    return payloads


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"output dtype {dtype} not supported; use one of {SUPPORTED_DTYPES}")


def _block_args(codec: Codec, hidden: int, device: torch.device) -> tuple:
    """`plans.block_args`, with window_max as the custom ops' List[int]."""
    args = block_args(codec, hidden, device)
    return args[:7] + (list(args[7]),) + args[8:]


def _traced_encode(codec: Codec, x: Tensor, source: int) -> Tensor:
    """`encode` through the custom ops (torch.compile)."""
    x = x.contiguous()
    hidden = x.shape[1]
    if isinstance(codec, StaticOutlierCodec):
        t = outlier_tables(codec, x.device)
        return torch.ops.tpcomp.static_encode(x, t.lo, t.inv, t.chan, source_row(source, t.sources))
    if isinstance(codec, LowRankCodec):  # coordinates by one matmul, the rest in the block kernel
        tail, coef = code_coordinates(codec, coordinates(x, codec.basis(source, x.device)))
        return torch.ops.tpcomp.block_encode(x, *_block_args(codec, hidden, x.device), codec.row_bytes(hidden),
                                             _lowrank_sum(codec, coef[None], [source]), tail)
    return torch.ops.tpcomp.block_encode(x, *_block_args(codec, hidden, x.device), codec.row_bytes(hidden))


FEEDBACK_CODECS = (BlockCodec, LowRankCodec)
"""Codecs whose encode can fold in error feedback (`encode_feedback`)."""


def _traced_encode_feedback(codec: Codec, x: Tensor, debt: Tensor, source: int) -> Tensor:
    """`encode_feedback` through the custom ops (torch.compile)."""
    x = x.contiguous()
    hidden = x.shape[1]
    element, block, scale, data_bytes, _, _, _, _, slots_off = _block_args(codec, hidden, x.device)
    args = (element, block, scale, data_bytes, slots_off, codec.row_bytes(hidden))
    if isinstance(codec, LowRankCodec):  # the coordinates are those of x + debt (one matmul)
        tail, coef = code_coordinates(codec, coordinates(x.float() + debt, codec.basis(source, x.device)))
        return torch.ops.tpcomp.block_encode_feedback(x, debt, *args, _lowrank_sum(codec, coef[None], [source]), tail)
    return torch.ops.tpcomp.block_encode_feedback(x, debt, *args)


def code_coordinates(codec: LowRankCodec, coef: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 coordinates [rows, K] -> (their bytes in the payload, the float32 values the decoder
    reads back): `LowRankCodec.code_coordinates` through the block kernels."""
    if codec.coords is None:  # bf16 coordinates: plain tensor ops, any device
        return codec.code_coordinates(coef)
    tail = encode(codec.coords, coef, source=0)
    return tail, decode_each(codec.coords, tail.unsqueeze(0), codec.spec.rank, sources=[0], dtype=torch.float32)


def _lowrank_sum(codec: LowRankCodec, coefs: Tensor, sources: Sequence[int]) -> Tensor:
    """`lowrank_sum` of `coefs` [n, rows, K] with the bases of `sources` (`plans.lowrank_bases`)."""
    return lowrank_sum(coefs, lowrank_bases(codec, sources, coefs.device))


def coordinate_values(codec: LowRankCodec, payloads: Tensor, slots_off: int) -> Tensor:
    """The coordinates of payloads [n, rows, row_bytes] (their tails), float32 [n, rows, K]."""
    n, rows, _ = payloads.shape
    tails = payloads[:, :, slots_off:].contiguous()
    if codec.coords is None:  # bf16 coordinates: plain tensor ops, any device
        return codec.coordinate_values(tails)
    k = codec.spec.rank
    flat = decode_each(codec.coords, tails.view(1, n * rows, -1), k, sources=[0], dtype=torch.float32)
    return flat.view(n, rows, k)


def _decode_lowrank(codec: LowRankCodec, payloads: Tensor, hidden: int, sources: Sequence[int], dtype: torch.dtype,
                    mode: str, out_source: int) -> Tensor:
    """The low-rank parts come from one GEMM over every source's coordinates (one per payload
    for 'each'), which the block kernel adds to the block parts; a requantized sum needs the
    full rows' coordinates first, so 'encode' is a decode in float32 and an encode."""
    args = _block_args(codec, hidden, payloads.device)
    coefs = coordinate_values(codec, payloads, args[-1])
    if mode == "each":
        lowrank = torch.cat([_lowrank_sum(codec, coefs[i:i + 1], [s]) for i, s in enumerate(sources)])
        return torch.ops.tpcomp.block_decode(payloads, hidden, *args, "each", dtype, lowrank)
    out = torch.ops.tpcomp.block_decode(payloads, hidden, *args, "sum", torch.float32 if mode == "encode" else dtype,
                                        _lowrank_sum(codec, coefs, sources))
    return encode(codec, out, source=out_source) if mode == "encode" else out


def _traced_decode(codec: Codec, payloads: Tensor, hidden: int, sources: Sequence[int], dtype: torch.dtype,
                   mode: str, out_source: int = 0) -> Tensor:
    """The decodes through the custom ops (torch.compile)."""
    if isinstance(codec, LowRankCodec):
        return _decode_lowrank(codec, payloads, hidden, sources, dtype, mode, out_source)
    if isinstance(codec, StaticOutlierCodec):
        t = outlier_tables(codec, payloads.device)
        lo, step, first, stride = static_sources(t, sources)
        return torch.ops.tpcomp.static_decode(payloads, hidden, lo, step, t.lo, t.inv, t.slot, t.chan, t.first,
                                              list(t.window_max), first,
                                              stride, mode, source_row(out_source, t.sources), dtype)
    return torch.ops.tpcomp.block_decode(payloads, hidden, *_block_args(codec, hidden, payloads.device), mode, dtype)


# -- public API ---------------------------------------------------------------------------------
# Eager calls replay a plan (plans.py): validated, set up and launched without the custom-op
# dispatcher; under torch.compile the same kernels run through the custom ops, which trace.
def encode(codec: Codec, x: Tensor, *, source: int, out: Tensor | None = None) -> Tensor:
    """`[rows, hidden]` bf16/fp16/fp32 -> payload `[rows, codec.row_bytes(hidden)]` uint8
    (written into `out` when given)."""
    if torch.compiler.is_compiling():
        return _with_out(_traced_encode(_checked_input(codec, x), x, source), out)
    return _eager_encode(codec, x, source, out, None, _checked_input)


def encode_feedback(codec: Codec, x: Tensor, debt: Tensor, *, source: int, out: Tensor | None = None) -> Tensor:
    """Payload of `x + debt` (`x` [rows, hidden] bf16/fp16/fp32, `debt` float32, contiguous),
    and `debt` overwritten with `x + debt` minus what that payload decodes to: error feedback's
    send and settle fused into the encode (one read of x, one read and one write of the debt)."""
    if debt.dtype != torch.float32 or debt.shape != x.shape or debt.device != x.device or not debt.is_contiguous():
        raise ValueError(f"debt must be a contiguous float32 tensor of the input's shape {tuple(x.shape)} on "
                         f"{x.device}; got {debt.dtype} {tuple(debt.shape)} on {debt.device}")
    if torch.compiler.is_compiling():
        return _with_out(_traced_encode_feedback(_checked_feedback(codec, x), x, debt, source), out)
    return _eager_encode(codec, x, source, out, debt, _checked_feedback)


def _eager_encode(codec: Codec, x: Tensor, source: int, out: Tensor | None, debt: Tensor | None, check) -> Tensor:
    plan = _encode_plan(codec, x, source, out, debt is not None, check)
    return plan(x if x.is_contiguous() else x.contiguous(), out, debt)


def _encode_plan(codec: Codec, x: Tensor, source: int, out: Tensor | None, feedback: bool, check):
    """The plan of this encode (built after `check` on first use; keyed on all it was set up
    for), with `out` checked against it."""
    odd = out is not None and out.data_ptr() & 1
    bucket = row_bucket(x.shape[0]) if x.dim() == 2 else None
    key = ("feedback" if feedback else "encode", bucket, x.shape[1:], x.dtype, x.device, source, odd)
    plans = memo(codec)
    plan = plans.get(key)
    if plan is None:
        check(codec, x)
        plan = plans[key] = encode_plan(codec, bucket, x.shape[1], x.dtype, x.device, source,
                                        feedback=feedback, odd=odd)
    if out is not None:
        check_out(out, (x.shape[0], codec.row_bytes(x.shape[1])), torch.uint8, x.device)
    return plan


def prepare_encode(codec: Codec, x: Tensor, *, source: int, out: Tensor | None = None):
    """`encode`'s plan for tensors like `x` (and like `out`): `plan(x, out)` -> the payload, for a
    contiguous `x` of `x`'s row bucket (`codecs.base.row_bucket`), width, dtype and device, and an `out`
    of its rows (unchecked: the caller keeps to them)."""
    return _encode_plan(codec, x, source, out, False, _checked_input)


def _checked_input(codec: Codec, x: Tensor) -> Codec:
    _check_codec(codec)
    codec.check_input(x)
    _check_device(x)
    return codec


def _checked_feedback(codec: Codec, x: Tensor) -> Codec:
    if not isinstance(codec, FEEDBACK_CODECS):
        raise ValueError(f"no fused error-feedback encode for {type(codec).__name__}; supported: "
                         f"{[c.__name__ for c in FEEDBACK_CODECS]}")
    return _checked_input(codec, x)


def _with_out(payload: Tensor, out: Tensor | None) -> Tensor:
    return payload if out is None else out.copy_(payload)


def _decode(codec: Codec, payloads: Tensor, hidden: int, sources: Sequence[int], dtype: torch.dtype, mode: str,
            out_source: int = 0) -> Tensor:
    if torch.compiler.is_compiling():
        payloads = _check_payloads(codec, payloads, hidden, sources).contiguous()
        return _traced_decode(codec, payloads, hidden, sources, dtype, mode, out_source)
    plan = prepare_decode(codec, payloads, hidden, sources=sources, dtype=dtype, mode=mode, out_source=out_source)
    return plan(payloads if payloads.is_contiguous() else payloads.contiguous())


def prepare_decode(codec: Codec, payloads: Tensor, hidden: int, *, sources: Sequence[int], dtype: torch.dtype,
                   mode: str, out_source: int = 0):
    """The plan of a decode (`mode` 'sum', 'each' or 'encode': `decode_sum`, `decode_each`,
    `decode_sum_encode`) of payloads like these: `plan(payloads)` -> a new tensor, for contiguous
    payloads [n, m, row_bytes] with m in this row bucket, on this device (unchecked: the caller
    keeps to them)."""
    sources = tuple(sources)
    odd = payloads.data_ptr() & 1
    shape = payloads.shape
    bucket = row_bucket(shape[1]) if len(shape) == 3 else None
    key = (mode, shape[0], bucket, shape[2:], hidden, dtype, payloads.device, sources, out_source, odd)
    plans = memo(codec)
    plan = plans.get(key)
    if plan is None:
        _check_payloads(codec, payloads, hidden, sources)
        _check_dtype(dtype)
        n, _, row_bytes = payloads.shape
        plan = plans[key] = decode_plan(codec, n, bucket, row_bytes, hidden, dtype, payloads.device, sources, mode,
                                        out_source, odd=odd)
    return plan


def decode_sum(codec: Codec, payloads: Tensor, hidden: int, *, sources: Sequence[int],
               dtype: torch.dtype) -> Tensor:
    """`[n, rows, row_bytes]` -> `[rows, hidden]`: float32 sum in index order from +0.0, as `dtype`."""
    return _decode(codec, payloads, hidden, sources, dtype, "sum")


def decode_sum_list(codec: Codec, payloads: Sequence[Tensor], hidden: int, *, sources: Sequence[int],
                    dtype: torch.dtype) -> Tensor:
    """`decode_sum` of n separate `[rows, row_bytes]` payloads (e.g. peers' symmetric-memory
    slots): block and hybrid codecs read them where they lie (`plans.decode_list_plan`); other
    codecs, and traced calls, decode them stacked."""
    payloads = list(payloads)
    if not payloads:
        raise ValueError("decode_sum_list needs at least one payload")
    first = payloads[0]
    direct = isinstance(codec, (BlockCodec, HybridCodec)) and not torch.compiler.is_compiling()
    if not direct or any(p.shape != first.shape or p.device != first.device or not p.is_contiguous()
                         for p in payloads):
        return _decode(codec, torch.stack(payloads), hidden, sources, dtype, "sum")
    n, sources = len(payloads), tuple(sources)
    even = all(p.data_ptr() % 2 == 0 for p in payloads)
    bucket = row_bucket(first.shape[0]) if first.dim() == 2 else None
    key = ("list", n, bucket, first.shape[1:], hidden, dtype, first.device, sources, even)
    plans = memo(codec)
    plan = plans.get(key)
    if plan is None:
        if first.dim() != 2:
            raise ValueError(f"payloads must be uint8 [rows, row_bytes] each; got {tuple(first.shape)}")
        _check_payloads(codec, first.unsqueeze(0), hidden, sources[:1])
        if len(sources) != n:
            raise ValueError(f"{len(sources)} sources given for {n} payloads")
        _check_dtype(dtype)
        plan = plans[key] = decode_list_plan(codec, n, bucket, first.shape[1], hidden, dtype, first.device,
                                             even=even)
    return plan(payloads)


def decode_sum_encode(codec: Codec, payloads: Tensor, hidden: int, *, sources: Sequence[int],
                      out_source: int) -> Tensor:
    """Sum n payloads in float32 and requantize the sum (source `out_source`) into one payload."""
    return _decode(codec, payloads, hidden, sources, torch.float32, "encode", out_source)


def decode_each(codec: Codec, payloads: Tensor, hidden: int, *, sources: Sequence[int],
                dtype: torch.dtype) -> Tensor:
    """`[n, rows, row_bytes]` -> `[n * rows, hidden]`: each payload decoded with its source."""
    return _decode(codec, payloads, hidden, sources, dtype, "each")
