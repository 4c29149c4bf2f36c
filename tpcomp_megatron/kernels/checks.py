"""Validation of the kernels' public calls, run once per plan (`api.py`), never per launch.

Which codecs the kernels cover (`SUPPORTED_CODECS`, `FEEDBACK_CODECS`), which device their
tensors must be on (`INTERPRETED`: built under TRITON_INTERPRET=1 they take CPU tensors, compiled
ones CUDA tensors), and the checks of inputs, payloads, output dtypes, decode modes and caller
buffers, each raising ValueError that names the valid choices.
"""

from __future__ import annotations

from typing import Sequence

import torch
from triton.runtime.interpreter import InterpretedFunction

from tpcomp_megatron.codecs.base import SUPPORTED_DTYPES, Codec
from tpcomp_megatron.codecs.block import BlockCodec
from tpcomp_megatron.codecs.lowrank import LowRankCodec
from tpcomp_megatron.codecs.outlier import HybridCodec, StaticOutlierCodec

from . import block as _block

Tensor = torch.Tensor
SUPPORTED_CODECS = (BlockCodec, StaticOutlierCodec, HybridCodec, LowRankCodec)
FEEDBACK_CODECS = (BlockCodec, LowRankCodec)
"""Codecs whose encode can fold in error feedback (`encode_feedback`)."""
# Kernels built while TRITON_INTERPRET=1 was set run on CPU tensors (tests); compiled ones need CUDA.
INTERPRETED = isinstance(_block._block_encode_kernel, InterpretedFunction)
MODES = ("sum", "each", "encode")
"""Decode modes: `decode_sum`, `decode_each`, `decode_sum_encode`."""


def check_codec(codec: Codec) -> None:
    if not isinstance(codec, SUPPORTED_CODECS):
        raise ValueError(f"no fused kernels for codec {type(codec).__name__}; supported: "
                         f"{[c.__name__ for c in SUPPORTED_CODECS]} (use the codec's reference methods)")


def check_device(t: Tensor) -> None:
    if INTERPRETED == t.is_cuda:
        need = "CPU tensors (the kernels were built with TRITON_INTERPRET=1)" if INTERPRETED else "CUDA tensors"
        raise ValueError(f"tpcomp kernels take {need}; got a tensor on {t.device}")


def checked_input(codec: Codec, x: Tensor) -> Codec:
    """`codec`, after checking that the kernels encode `x` with it."""
    check_codec(codec)
    codec.check_input(x)
    check_device(x)
    return codec


def checked_feedback(codec: Codec, x: Tensor) -> Codec:
    """`checked_input`, for the fused error-feedback encode."""
    if not isinstance(codec, FEEDBACK_CODECS):
        raise ValueError(f"no fused error-feedback encode for {type(codec).__name__}; supported: "
                         f"{[c.__name__ for c in FEEDBACK_CODECS]}")
    return checked_input(codec, x)


def check_debt(x: Tensor, debt: Tensor) -> None:
    if debt.dtype != torch.float32 or debt.shape != x.shape or debt.device != x.device or not debt.is_contiguous():
        raise ValueError(f"debt must be a contiguous float32 tensor of the input's shape {tuple(x.shape)} on "
                         f"{x.device}; got {debt.dtype} {tuple(debt.shape)} on {debt.device}")


def check_payloads(codec: Codec, payloads: Tensor, hidden: int, sources: Sequence[int]) -> Tensor:
    check_codec(codec)
    check_device(payloads)
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


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"output dtype {dtype} not supported; use one of {SUPPORTED_DTYPES}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; valid: {list(MODES)}")


def check_out(out: Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A buffer a plan will write into as it is: contiguous, of this shape, dtype and device."""
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {device}; "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
