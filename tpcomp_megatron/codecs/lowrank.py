"""Low-rank + block codec (`lowrank+<block spec>/r<K>`): reference implementation.

The row-parallel partial sums of a layer share a few directions from token to token (Gemma's and
Llama's consistently large channels are the visible part of them). A block codec spends its
scale on a block's largest value, so a shared direction concentrated in a few channels sets
the step of every block it touches. Here each rank projects a row on K calibrated orthonormal
directions (its own: the basis depends on the source), sends the K coordinates in bf16, and
block-codes the residual, whose blocks are then much flatter:

    coef  = bf16(x @ B_s^T)                [rows, K]
    resid = x - coef @ B_s                 (the coordinates' rounding stays in resid)
    row payload = [ block payload of resid ][ K coordinates, bf16 little-endian ]

Both products run in the input's precision class: bf16 input -> bf16 matmuls (float32
accumulation, one rounding of each result), fp16/fp32 input -> float32. Bases are rounded to bf16
once, at construction, so a bf16 matmul uses exactly the directions the decoder adds back. A
bf16 residual is exact to 2**-9 of itself, some 35 dB under what a 4- to 8-bit code loses; in
exchange the GPU path reads and writes half the bytes, and feeds the block kernel bf16 as any
partial sum would.

Decoding adds `coef @ B_s` back. A sum of n payloads is the block codec's sum of the residuals
(index order, bit-identical to the kernels) plus ONE float32 matmul of all coordinates with all
bases, `cat(coef) @ cat(B)`: the kernels path runs that same matmul, so CPU and GPU differ only
by the matmul's summation order.

Bases come from a calibration file (`Calibration.bases`, the leading right singular vectors of
each source's row-normalized partial sums: `tpcomp-calibrate`), one set per rank and one for the
reduced sum (`REDUCED`, the two-shot requantization), `[world + 1, K, hidden]`.

NaN/Inf policy: a non-finite value reaches every coordinate of its row, so the whole row (token)
decodes to NaN; other rows are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Codec
from .block import BlockCodec
from .spec import LowRankSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the projection runs in for an input of `dtype`."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def project(x: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [rows, hidden], `basis` [K, hidden] (bf16 values) -> (coordinates, bf16 [rows, K];
    residual [rows, hidden] in `compute_dtype(x.dtype)`)."""
    dt = compute_dtype(x.dtype)
    xc, b = x.to(dt), basis.to(dt)
    coef = (xc @ b.T).to(torch.bfloat16)
    return coef, torch.addmm(xc, coef.to(dt), b, alpha=-1.0)


def coef_bytes(coef: torch.Tensor) -> torch.Tensor:
    """bf16 [rows, K] -> uint8 [rows, 2K]."""
    return coef.contiguous().view(torch.uint8)


def coef_values(tail: torch.Tensor) -> torch.Tensor:
    """uint8 [..., rows, 2K] -> float32 [..., rows, K]."""
    return tail.contiguous().view(torch.bfloat16).float()


def add_lowrank_sum(acc: torch.Tensor, tails: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """`acc` [rows, hidden] float32 plus the sum of the low-rank parts of n payloads (coordinates
    `[n, rows, 2K]`, bases `[n, K, hidden]`): one matmul over all n x K coordinates."""
    n, rows, _ = tails.shape
    coef = coef_values(tails).permute(1, 0, 2).reshape(rows, -1)
    return torch.addmm(acc, coef, bases.reshape(-1, bases.shape[-1]))


def add_lowrank_each(acc: torch.Tensor, tails: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """`acc` [n * rows, hidden] float32 (n decoded payloads, stacked) plus each one's low-rank part."""
    n, rows, _ = tails.shape
    return torch.baddbmm(acc.view(n, rows, -1), coef_values(tails), bases).view(n * rows, -1)


class LowRankCodec(Codec):
    """`lowrank+<block spec>/r<K>` with calibrated bases `[sources, K, hidden]` (sources: ranks,
    then the reduced sum; a source index -1 (`REDUCED`) picks the last)."""

    def __init__(self, spec: LowRankSpec, bases: torch.Tensor):
        if not isinstance(bases, torch.Tensor) or bases.dim() != 3 or bases.shape[1] != spec.rank:
            got = tuple(bases.shape) if isinstance(bases, torch.Tensor) else type(bases).__name__
            raise ValueError(f"{spec} needs calibrated bases [sources, {spec.rank}, hidden] (tools/calibrate.py), got {got}")
        if not torch.isfinite(bases).all():
            raise ValueError(f"{spec}: the calibrated bases hold non-finite values")
        self.spec = spec
        self.block = BlockCodec(spec.base)
        self.bases = bases.to(torch.bfloat16).float().contiguous()  # see the module docstring
        self._on_device: dict[torch.device, torch.Tensor] = {}  # copies, made once per device

    @property
    def hidden(self) -> int:
        return self.bases.shape[2]

    def _bases_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.bases.to(device)
        return self._on_device[device]

    def _index(self, source: int) -> int:
        if not -1 <= source < self.bases.shape[0] - 1:
            raise ValueError(f"{self.spec}: source {source} is not one of the {self.bases.shape[0] - 1} calibrated ranks")
        return source

    def basis(self, source: int, device: torch.device) -> torch.Tensor:
        """`[K, hidden]` directions of `source` (a rank, or -1 = `REDUCED`)."""
        return self._bases_on(device)[self._index(source)]

    def source_bases(self, sources: Sequence[int], device: torch.device) -> torch.Tensor:
        """`[n, K, hidden]` directions of each source in order."""
        idx = [self._index(int(s)) % self.bases.shape[0] for s in sources]
        b = self._bases_on(device)
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return b[idx[0]:idx[0] + len(idx)]  # the usual case, ranks 0..n-1: a view, no copy
        return b[idx]

    def ineligible(self, hidden: int) -> str | None:
        if hidden != self.hidden:
            return f"calibration is for hidden size {self.hidden}, the tensor has {hidden}"
        return self.block.ineligible(hidden)

    def data_bytes(self, hidden: int) -> int:
        """Bytes of the block part of a row (the coordinates follow)."""
        return self.block.row_bytes(hidden)

    def row_bytes(self, hidden: int) -> int:
        return self.block.row_bytes(hidden) + 2 * self.spec.rank

    def bits_per_value(self, hidden: int) -> float:
        return self.row_bytes(hidden) * 8 / hidden

    def encode(self, x: torch.Tensor, *, source: int = 0) -> torch.Tensor:
        self.check_input(x)
        coef, resid = project(x, self.basis(source, x.device))
        return torch.cat([self.block.encode(resid), coef_bytes(coef)], dim=1)

    def decode_f32(self, payload: torch.Tensor, hidden: int, *, source: int = 0) -> torch.Tensor:
        n = self.data_bytes(hidden)
        acc = self.block.decode_f32(payload[:, :n], hidden)
        return add_lowrank_each(acc, payload[None, :, n:], self.basis(source, payload.device)[None])

    def decode_sum_f32(self, payloads: torch.Tensor, hidden: int, sources: Sequence[int] | None = None) -> torch.Tensor:
        sources = range(payloads.shape[0]) if sources is None else sources
        n = self.data_bytes(hidden)
        acc = self.block.decode_sum_f32(payloads[:, :, :n], hidden)
        return add_lowrank_sum(acc, payloads[:, :, n:], self.source_bases(sources, payloads.device))
