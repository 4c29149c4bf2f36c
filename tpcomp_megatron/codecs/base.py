"""What every codec provides: a fixed-size uint8 payload per row, and its inverse.

A codec encodes a `[rows, hidden]` tensor (bf16, fp16 or fp32) into ONE contiguous uint8 tensor
`[rows, row_bytes(hidden)]`, data and scales together, so that a single collective moves it and
any range of rows is a contiguous byte range (the reduce-scatter splits payloads by rows).

`source` names whose static parameters apply: rank r's own partial sum (0 <= r < world) or
`REDUCED` (the full sum, requantized in the middle of the two-shot all-reduce). Dynamic codecs
ignore it.

These methods are the float32 PyTorch reference. `tpcomp_megatron.ops` dispatches CUDA tensors
to the fused Triton kernels, which are tested bit-for-bit against these.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Sequence

import torch

REDUCED = -1
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def row_bucket(rows: int) -> int:
    """The row bucket of `rows`: 0, or the power of two at or above it. Rows are coded
    independently, so what is set up for a bucket (kernel plans, payload buffers) serves every
    row count in it."""
    return 1 << (rows - 1).bit_length() if rows > 0 else 0


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 (16 hex digits) of tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class Codec(ABC):
    """A reference codec. Subclasses are immutable after construction.

    Codecs compare and hash by value (`identity`: kind, spec and a digest of the calibrated
    parameters), so every layer whose codec has the same value shares what is set up for it (the
    collectives' plans, the gate's answers); two layers with the same spec but other calibration
    data do not."""

    spec: object
    kernel_cost: float = 1.0
    """GPU time of encode + decode_sum relative to the block codec of the same width (measured;
    the gate asks more bytes of a costlier codec before compressing)."""
    pads_rows_exactly: bool = True
    """Whether a row's payload (and a sum's row) is the same bytes whatever other rows the call
    holds, on every device: true of the codecs' own kernels, which code rows independently, so a
    call may be padded with extra rows (`comm/graphs.py`); false where a library GEMM over the
    rows may choose another algorithm for another row count."""

    @abstractmethod
    def row_bytes(self, hidden: int) -> int:
        """Payload bytes of one row of `hidden` values."""

    @abstractmethod
    def ineligible(self, hidden: int) -> str | None:
        """Why a row of `hidden` values cannot be encoded, or None when it can."""

    @abstractmethod
    def bits_per_value(self, hidden: int) -> float:
        """Payload bits per value, scales included."""

    @abstractmethod
    def encode(self, x: torch.Tensor, *, source: int = 0) -> torch.Tensor:
        """`[rows, hidden]` -> `[rows, row_bytes]` uint8."""

    @abstractmethod
    def decode_f32(self, payload: torch.Tensor, hidden: int, *, source: int = 0) -> torch.Tensor:
        """`[rows, row_bytes]` uint8 -> `[rows, hidden]` float32."""

    def decode(self, payload: torch.Tensor, hidden: int, *, source: int = 0,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.decode_f32(payload, hidden, source=source).to(dtype)

    def decode_sum_f32(self, payloads: torch.Tensor, hidden: int,
                       sources: Sequence[int] | None = None) -> torch.Tensor:
        """`[n, rows, row_bytes]` -> float32 sum over the n payloads, added in index order
        starting from +0.0 (the kernels use the same order, so results match bit for bit)."""
        sources = range(payloads.shape[0]) if sources is None else sources
        acc = torch.zeros(payloads.shape[1], hidden, dtype=torch.float32, device=payloads.device)
        for p, src in zip(payloads, sources):
            acc = acc + self.decode_f32(p, hidden, source=src)
        return acc

    def decode_sum(self, payloads: torch.Tensor, hidden: int, sources: Sequence[int] | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.decode_sum_f32(payloads, hidden, sources).to(dtype)

    def parameters(self) -> tuple[torch.Tensor, ...]:
        """The calibrated tensors the payloads depend on beyond the spec (none for block codecs)."""
        return ()

    @property
    def identity(self) -> tuple:
        """(kind, spec, digest of `parameters()`): the codec's value (computed once)."""
        got = self.__dict__.get("_identity")
        if got is None:
            params = self.parameters()
            got = self.__dict__["_identity"] = (type(self).__name__, str(self.spec),
                                                tensor_digest(*params) if params else "")
        return got

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Codec) and self.identity == other.identity)

    def __hash__(self) -> int:
        return hash(self.identity)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for a tensor this codec cannot encode."""
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{self.spec}: dtype {x.dtype} not supported; use one of {SUPPORTED_DTYPES}")
        if x.dim() != 2:
            raise ValueError(f"{self.spec}: expected a [rows, hidden] tensor, got shape {tuple(x.shape)}")
        why = self.ineligible(x.shape[1])
        if why:
            raise ValueError(f"{self.spec}: {why}")
