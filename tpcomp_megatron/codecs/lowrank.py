"""Low-rank + block codec (`lowrank+<block spec>/r<K>`): reference implementation.

The row-parallel partial sums of a layer share a few directions from token to token (Gemma's and
Llama's consistently large channels are the visible part of them). A block codec spends its
scale on a block's largest value, so a shared direction concentrated in a few channels sets
the step of every block it touches. Here each rank projects a row on K calibrated orthonormal
directions (its own: the basis depends on the source), sends the K coordinates, and block-codes
the residual, whose blocks are then much flatter:

    coef  = bf16(x @ B_s^T)                [rows, K]
    c     = coef, or with `/c<element>` what coef's block payload decodes to (float32)
    resid = x - c_0 b_0 - c_1 b_1 - ...    float32, one direction at a time, in k order
    row payload = [ block payload of resid ][ coordinates: K bf16 little-endian, or their payload ]

Coded coordinates (`/c<element>`: the residual's block size and scale type, that element) cost
4-8 bits each instead of 16, so many more directions fit the same bits; their coding error is
not lost but lands in the residual, which the block codec then codes with the rest. At TP=8 a
rank's partial sum of Gemma 3 270M lies in a 128-dimensional (attention) or 256-dimensional
(MLP) subspace of its 640 channels (the rank's slice of the weight has that many columns), so
tens of directions carry most of a row's energy.

Decoding adds c_k b_k back the same way; a sum of n payloads adds the n decoded rows in index
order from +0.0 (`Codec.decode_sum_f32`). The fused kernels do these float32 steps in the same
order (no FMA), so they match the reference bit for bit on the same coordinates; only the
coordinates' matmul (x @ B^T, a bf16 matmul for bf16 input, float32 otherwise) may round
differently on the GPU, where cuBLAS sums in another order. Bases are rounded to bf16 once, at
construction, so that bf16 matmul uses exactly the directions the decoder adds back.

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


def coordinates(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`x` [rows, hidden], `basis` [K, hidden] (bf16 values) -> bf16 coordinates [rows, K]: a bf16
    matmul (float32 accumulation) for bf16 input, float32 otherwise."""
    dt = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    return (x.to(dt) @ basis.to(dt).T).to(torch.bfloat16)


def add_lowrank(v: torch.Tensor, coef: torch.Tensor, basis: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """v [rows, hidden] float32 + sign * sum_k coef[:, k] * basis[k], one k at a time (the
    kernels' order; a matmul would sum in its own)."""
    for k in range(basis.shape[0]):
        term = coef[:, k:k + 1].float() * basis[k]
        v = v + term if sign > 0 else v - term
    return v


def coef_bytes(coef: torch.Tensor) -> torch.Tensor:
    """bf16 [rows, K] -> uint8 [rows, 2K]."""
    return coef.contiguous().view(torch.uint8)


def coef_values(tail: torch.Tensor) -> torch.Tensor:
    """uint8 [..., rows, 2K] -> bf16 [..., rows, K]."""
    return tail.contiguous().view(torch.bfloat16)


class LowRankCodec(Codec):
    """`lowrank+<block spec>/r<K>` with calibrated bases `[sources, K, hidden]` (sources: ranks,
    then the reduced sum; a source index -1 (`REDUCED`) picks the last)."""

    LOWRANK_KERNEL_COST = 5.0
    """H100, 8 sources, 128 MB: encode + decode_sum 1.06 ms (r4) and 1.22 ms (r8) against 0.25 ms
    for fp4_e2m1/b32/e6m2 (benchmarks/results/kernels_lowrank_h100_2026-11-24.md); times the
    block codec's own cost (a codebook element), an upper bound."""

    def __init__(self, spec: LowRankSpec, bases: torch.Tensor):
        if not isinstance(bases, torch.Tensor) or bases.dim() != 3 or bases.shape[1] != spec.rank:
            got = tuple(bases.shape) if isinstance(bases, torch.Tensor) else type(bases).__name__
            raise ValueError(f"{spec} needs calibrated bases [sources, {spec.rank}, hidden] (tools/calibrate.py), got {got}")
        if not torch.isfinite(bases).all():
            raise ValueError(f"{spec}: the calibrated bases hold non-finite values")
        self.spec = spec
        self.block = BlockCodec(spec.base)
        self.coords = None if spec.coord_spec is None else BlockCodec(spec.coord_spec)
        self.kernel_cost = self.LOWRANK_KERNEL_COST * self.block.kernel_cost
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

    def coord_bytes(self) -> int:
        """Bytes of a row's coordinates (the payload's tail)."""
        k = self.spec.rank
        return 2 * k if self.coords is None else self.coords.row_bytes(k)

    def code_coordinates(self, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 coordinates [rows, K] -> (their bytes in the payload [rows, coord_bytes], the
        float32 values the decoder will read back)."""
        if self.coords is None:
            return coef_bytes(coef), coef.float()
        tail = self.coords.encode(coef)
        return tail, self.coords.decode_f32(tail, self.spec.rank)

    def coordinate_values(self, tail: torch.Tensor) -> torch.Tensor:
        """The payload's tail [rows, coord_bytes] -> float32 coordinates [rows, K]."""
        if self.coords is None:
            return coef_values(tail).float()
        return self.coords.decode_f32(tail, self.spec.rank)

    def row_bytes(self, hidden: int) -> int:
        return self.block.row_bytes(hidden) + self.coord_bytes()

    def bits_per_value(self, hidden: int) -> float:
        return self.row_bytes(hidden) * 8 / hidden

    def encode(self, x: torch.Tensor, *, source: int = 0) -> torch.Tensor:
        self.check_input(x)
        basis = self.basis(source, x.device)
        tail, coef = self.code_coordinates(coordinates(x, basis))
        resid = add_lowrank(x.float(), coef, basis, sign=-1.0)
        return torch.cat([self.block.encode(resid), tail], dim=1)

    def decode_f32(self, payload: torch.Tensor, hidden: int, *, source: int = 0) -> torch.Tensor:
        n = self.data_bytes(hidden)
        v = self.block.decode_f32(payload[:, :n], hidden)
        return add_lowrank(v, self.coordinate_values(payload[:, n:]), self.basis(source, payload.device))
