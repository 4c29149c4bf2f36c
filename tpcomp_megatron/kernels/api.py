"""Public kernel API: the codec operations of `tpcomp_megatron.ops`, one route for eager calls and
torch.compile.

`encode`, `encode_feedback`, `decode_sum`, `decode_sum_list`, `decode_sum_encode` and
`decode_each` take a codec object and validate their inputs (`checks.py`). Every call runs its
codec's plan (`plans.py`), built by the same function either way:

* eager: validated and built once per codec, operation, row bucket, shape, dtype, device and
  sources, memoized on the codec, and run with prepared launches (`steps.DIRECT`), without the
  custom-op dispatcher, whose Python layer cost more host time than the kernels;
  `prepare_encode` / `prepare_decode` hand such a plan to a caller that keeps it
  (`comm/engine.py`);
* traced by torch.compile: built per trace with the custom ops (`steps.TRACED`,
  `torch.ops.tpcomp.*`: plain tensors, ints and strings, fake implementations) as its kernel
  steps; each op's implementation is the direct step of the same launch.

Both produce the same bytes as the codec's PyTorch reference, and both replay inside CUDA graphs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tpcomp_megatron.codecs.base import Codec, row_bucket
from tpcomp_megatron.codecs.block import BlockCodec
from tpcomp_megatron.codecs.outlier import HybridCodec

from .checks import (FEEDBACK_CODECS, INTERPRETED, SUPPORTED_CODECS, check_debt, check_dtype, check_mode, check_out,
                     check_payloads, checked_feedback, checked_input)
from .plans import block_args, decode_list_plan, decode_plan, encode_plan, memo
from .steps import TRACED

Tensor = torch.Tensor
__all__ = ["FEEDBACK_CODECS", "INTERPRETED", "SUPPORTED_CODECS", "decode_each", "decode_sum", "decode_sum_encode",
           "decode_sum_list", "encode", "encode_feedback", "prepare_decode", "prepare_encode"]


def _block_args(codec: Codec, hidden: int, device: torch.device) -> tuple:
    """`plans.block_args` as the custom ops `tpcomp::block_encode` / `tpcomp::block_decode` take
    them (window_max a List[int]), for calling the ops by hand (tests, tools)."""
    args = block_args(codec, hidden, device)
    return args[:7] + (list(args[7]),) + args[8:]


# -- traced (torch.compile): the codec's plan over the custom ops, built per trace ---------------
def _traced_encode(codec: Codec, x: Tensor, source: int, out: Tensor | None = None) -> Tensor:
    """`encode` as torch.compile records it."""
    plan = encode_plan(codec, None, x.shape[1], x.dtype, x.device, source, feedback=False, odd=False, steps=TRACED)
    return plan(x.contiguous(), out)


def _traced_encode_feedback(codec: Codec, x: Tensor, debt: Tensor, source: int, out: Tensor | None = None) -> Tensor:
    """`encode_feedback` as torch.compile records it."""
    plan = encode_plan(codec, None, x.shape[1], x.dtype, x.device, source, feedback=True, odd=False, steps=TRACED)
    return plan(x.contiguous(), out, debt)


def _traced_decode(codec: Codec, payloads: Tensor, hidden: int, sources: Sequence[int], dtype: torch.dtype,
                   mode: str, out_source: int = 0) -> Tensor:
    """The decodes as torch.compile records them."""
    check_mode(mode)
    n, _, row_bytes = payloads.shape
    plan = decode_plan(codec, n, None, row_bytes, hidden, dtype, payloads.device, tuple(sources), mode, out_source,
                       odd=False, steps=TRACED)
    return plan(payloads.contiguous())


# -- public API ---------------------------------------------------------------------------------
def encode(codec: Codec, x: Tensor, *, source: int, out: Tensor | None = None) -> Tensor:
    """`[rows, hidden]` bf16/fp16/fp32 -> payload `[rows, codec.row_bytes(hidden)]` uint8
    (written into `out` when given)."""
    if torch.compiler.is_compiling():
        return _traced_encode(checked_input(codec, x), x, source, out)
    return _eager_encode(codec, x, source, out, None, checked_input)


def encode_feedback(codec: Codec, x: Tensor, debt: Tensor, *, source: int, out: Tensor | None = None) -> Tensor:
    """Payload of `x + debt` (`x` [rows, hidden] bf16/fp16/fp32, `debt` float32, contiguous),
    and `debt` overwritten with `x + debt` minus what that payload decodes to: error feedback's
    send and settle fused into the encode (one read of x, one read and one write of the debt)."""
    check_debt(x, debt)
    if torch.compiler.is_compiling():
        return _traced_encode_feedback(checked_feedback(codec, x), x, debt, source, out)
    return _eager_encode(codec, x, source, out, debt, checked_feedback)


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
    return _encode_plan(codec, x, source, out, False, checked_input)


def _decode(codec: Codec, payloads: Tensor, hidden: int, sources: Sequence[int], dtype: torch.dtype, mode: str,
            out_source: int = 0) -> Tensor:
    if torch.compiler.is_compiling():
        check_payloads(codec, payloads, hidden, sources)
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
        check_mode(mode)
        check_payloads(codec, payloads, hidden, sources)
        check_dtype(dtype)
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
        check_payloads(codec, first.unsqueeze(0), hidden, sources[:1])
        if len(sources) != n:
            raise ValueError(f"{len(sources)} sources given for {n} payloads")
        check_dtype(dtype)
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
