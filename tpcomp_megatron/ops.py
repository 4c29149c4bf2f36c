"""The codec operations the collectives need, dispatched by device.

CUDA tensors go to the fused Triton kernels (`tpcomp_megatron.kernels`); everything else, and
any codec the kernels do not cover, to the codec's PyTorch reference. Both produce the same bytes.
This module only dispatches: the kernels' one route (a per-codec plan, run with prepared launches
eagerly and over the custom ops `torch.ops.tpcomp.*` under torch.compile) is in
`kernels/plans.py` and `kernels/steps.py`, which registers the ops. The kernels never import this
module (imported lazily here, so a machine without Triton runs the reference).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch

from .codecs.base import Codec


@lru_cache(maxsize=1)
def _kernels():
    try:
        from . import kernels
    except ImportError:  # no Triton: the reference path serves every device
        return None
    return kernels


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def _use_kernels(t: torch.Tensor):
    if not t.is_cuda:
        return None
    return _kernels()


def encode(codec: Codec, x: torch.Tensor, *, source: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """`[rows, hidden]` -> payload `[rows, row_bytes]` (written into `out` when given)."""
    k = _use_kernels(x)
    if k is not None:
        return k.encode(codec, x, source=source, out=out)  # writes straight into `out`
    payload = codec.encode(x, source=source)
    return payload if out is None else out.copy_(payload)


def encode_feedback(codec: Codec, x: torch.Tensor, debt: torch.Tensor, *, source: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Payload of `x + debt` (error feedback's send; `debt` float32 `[rows, hidden]`), and `debt`
    overwritten in place with that send minus what the payload decodes to (its settle): one
    fused kernel for block and low-rank codecs on CUDA, the reference's steps elsewhere."""
    k = _use_kernels(x)
    if k is not None and isinstance(codec, k.FEEDBACK_CODECS):
        return k.encode_feedback(codec, x, debt, source=source, out=out)
    # the unfused steps (a codec without the fused kernel, or not on CUDA)
    send = x.float() + debt
    payload = encode(codec, send, source=source, out=out)
    debt.copy_(send - decode_each(codec, payload.unsqueeze(0), x.shape[1], sources=[source], dtype=torch.float32))
    return payload


def decode_sum(codec: Codec, payloads: torch.Tensor, hidden: int, *, sources: Sequence[int],
               dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`[n, rows, row_bytes]` -> `[rows, hidden]` sum in float32, returned in `dtype` (copied into
    `out` when given)."""
    k = _use_kernels(payloads)
    if k is not None:
        return _into(out, k.decode_sum(codec, payloads, hidden, sources=sources, dtype=dtype))
    return _into(out, codec.decode_sum(payloads, hidden, sources, dtype=dtype))


def decode_sum_list(codec: Codec, payloads: Sequence[torch.Tensor], hidden: int, *,
                    sources: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Like `decode_sum`, for n separate `[rows, row_bytes]` payloads (e.g. peers' buffers)."""
    k = _use_kernels(payloads[0])
    if k is not None:  # read where they lie (block and hybrid codecs)
        return k.decode_sum_list(codec, list(payloads), hidden, sources=sources, dtype=dtype)
    return decode_sum(codec, torch.stack(list(payloads)), hidden, sources=sources, dtype=dtype)


def decode_sum_encode(codec: Codec, payloads: torch.Tensor, hidden: int, *, sources: Sequence[int],
                      out_source: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum n payloads in float32 and requantize the sum (no rounding to bf16 in between; copied
    into `out` when given)."""
    k = _use_kernels(payloads)
    if k is not None:
        return _into(out, k.decode_sum_encode(codec, payloads, hidden, sources=sources, out_source=out_source))
    return _into(out, codec.encode(codec.decode_sum_f32(payloads, hidden, sources), source=out_source))


def decode_each(codec: Codec, payloads: torch.Tensor, hidden: int, *, sources: Sequence[int],
                dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`[n, rows, row_bytes]` -> `[n * rows, hidden]`: each payload decoded, concatenated (copied
    into `out` when given)."""
    k = _use_kernels(payloads)
    if k is not None:
        return _into(out, k.decode_each(codec, payloads, hidden, sources=sources, dtype=dtype))
    return _into(out, torch.cat([codec.decode(p, hidden, source=s, dtype=dtype) for p, s in zip(payloads, sources)]))


# -- prepared operations: set up once for tensors of one shape, then called again and again ------
def prepare_encode(codec: Codec, x: torch.Tensor, *, source: int, out: torch.Tensor | None = None) -> Callable:
    """`fn(x, out)`: `encode` of a contiguous `[m, hidden]` tensor of `x`'s dtype and device, m in
    `x`'s row bucket (`codecs.base.row_bucket`), into a contiguous uint8 `[m, row_bytes]` buffer
    (like `out`, when given), validated once, here (the CUDA kernels' launch plan; the reference
    elsewhere)."""
    k = _use_kernels(x)
    if k is not None:
        return k.prepare_encode(codec, x, source=source, out=out)
    codec.check_input(x)

    def reference(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(codec.encode(x, source=source))
    return reference


_DECODES = {"sum": decode_sum, "each": decode_each}


def prepare_decode(codec: Codec, payloads: torch.Tensor, hidden: int, *, sources: Sequence[int],
                   dtype: torch.dtype, mode: str, out_source: int = 0) -> Callable:
    """`fn(payloads, out=None)` -> a new tensor (or `out`, written): `decode_sum` (`mode` 'sum'),
    `decode_each` ('each') or `decode_sum_encode` ('encode', to source `out_source`) of contiguous
    payloads `[n, m, row_bytes]` on this device, m in the row bucket of `payloads`' rows, validated
    once, here."""
    if mode not in ("sum", "each", "encode"):
        raise ValueError(f"unknown decode mode {mode!r}; valid: 'sum', 'each', 'encode'")
    sources = tuple(sources)
    k = _use_kernels(payloads)
    if k is not None:
        return k.prepare_decode(codec, payloads, hidden, sources=sources, dtype=dtype, mode=mode,
                                out_source=out_source)
    if mode == "encode":
        return lambda p, out=None: decode_sum_encode(codec, p, hidden, sources=sources, out_source=out_source,
                                                     out=out)
    fn = _DECODES[mode]
    return lambda p, out=None: fn(codec, p, hidden, sources=sources, dtype=dtype, out=out)
