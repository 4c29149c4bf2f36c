"""Low-rank + block codec (`lowrank+<block spec>/r<K>`): reference implementation.

The row-parallel partial sums of a layer share a few directions from token to token (Gemma's and
Llama's consistently large channels are the visible part of them). A block codec spends its
scale on a block's largest value, so a shared direction concentrated in a few channels sets
the step of every block it touches. Here each rank projects a row on K calibrated orthonormal
directions (its own: the basis depends on the source), sends the K coordinates, and block-codes
the residual, whose blocks are then much flatter:

    coef  = bf16(x @ B_s^T)                [rows, K]
    c     = coef, or with `/c<element>` what coef's block payload decodes to (float32)
    resid = x - c @ B_s                     float32 (one float32 matmul)
    row payload = [ block payload of resid ][ coordinates: K bf16 little-endian, or their payload ]

Coded coordinates (`/c<element>`: the residual's block size and scale type, that element) cost
4-8 bits each instead of 16, so many more directions fit the same bits; their coding error is
not lost but lands in the residual, which the block codec then codes with the rest. At TP=8 a
rank's partial sum of Gemma 3 270M lies in a subspace of at most 256 of its 640 channels (the
rank's slice of the weight has 256 columns: a quarter of the MLP, or one of the four attention
heads, the other ranks holding none), so tens of directions carry most of a row's energy.

Decoding adds c @ B_s back. A sum of n payloads adds the n block parts in index order from +0.0,
then all low-rank parts at once, as one matmul of the n sources' coordinates side by side
`[rows, n K]` with their bases stacked `[n K, hidden]` (`lowrank_sum`): on the GPU that is one
tensor-core GEMM (a loop over directions in the kernel was 55x slower at K = 128). The fused
kernels take that matmul's float32 result and do the other steps in the reference's order, so
on the CPU (the interpreter) they match it bit for bit. On the GPU the matmuls are cuBLAS's,
which sum in another order: decoded values may differ from the CPU's in the last bits, and a
coordinate, and so a code, may round the other way. Bases are rounded to bf16 once, at
construction; coordinates that bf16 holds exactly (bf16 ones, or coded with a floating-point
element and a power-of-two or E6M2 scale: `coords_exact_in_bf16`) go through a bf16 GEMM with
float32 output on the GPU, which computes the same products as float32.

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


def lowrank_sum(coefs: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """sum_i coefs[i] @ bases[i], float32 [rows, hidden], as ONE matmul of the coordinates side by
    side (`coefs` [n, rows, K]) with the bases stacked (`bases` [n, K, hidden]). float32 bases: a
    float32 matmul; bf16 bases (the GPU path, for coordinates bf16 holds exactly): a bf16 GEMM
    with float32 output, the same products."""
    n, rows, k = coefs.shape
    side = coefs.to(bases.dtype).permute(1, 0, 2).reshape(rows, n * k)
    if bases.dtype == torch.bfloat16:
        return torch.mm(side, bases.reshape(n * k, -1), out_dtype=torch.float32)
    return side.float() @ bases.float().reshape(n * k, -1)


def coef_bytes(coef: torch.Tensor) -> torch.Tensor:
    """bf16 [rows, K] -> uint8 [rows, 2K]."""
    return coef.contiguous().view(torch.uint8)


def coef_values(tail: torch.Tensor) -> torch.Tensor:
    """uint8 [..., rows, 2K] -> bf16 [..., rows, K]."""
    return tail.contiguous().view(torch.bfloat16)


def _exact_in_bf16(spec) -> bool:
    """Whether every decoded value of block spec `spec` (an element level times a scale) has at
    most bf16's 8 significant bits: floating-point and small integer elements with a
    power-of-two or E6M2 scale; not codebooks (12-bit levels) nor bf16 scales."""
    from .formats import FORMATS

    fmt = FORMATS[spec.element]
    if fmt.is_codebook:
        return False
    element = fmt.mbits + 1 if fmt.ebits else fmt.bits - 1
    scale = {"e8m0": 1, "e8m0up": 1, "e6m2": 3}.get(spec.scale, 8)
    return element + scale <= 8


class LowRankCodec(Codec):
    """`lowrank+<block spec>/r<K>` with calibrated bases `[sources, K, hidden]` (sources: ranks,
    then the reduced sum; a source index -1 (`REDUCED`) picks the last)."""

    LOWRANK_KERNEL_COST = 3.0
    """Times the block codec's own cost (an upper bound). H100, 8 sources, hidden 8192, with the
    low-rank parts as GEMMs (benchmarks/results/kernels_lowrank_gemm_h100_2026-12-06.md): encode +
    decode_sum 1.9-2.2x the plain block codec's time at 32-128 MB for r4 (bf16 coordinates) to
    r128 (coded), 2.6-4x at 8 MB; the per-direction loop this replaced took 5x at r4 and 70x
    at r128."""

    pads_rows_exactly = False
    """The coordinates are a cuBLAS GEMM over the call's rows, which may choose another algorithm
    (other rounding) for another row count."""

    def __init__(self, spec: LowRankSpec, bases: torch.Tensor):
        if not isinstance(bases, torch.Tensor) or bases.dim() != 3 or bases.shape[1] != spec.rank:
            got = tuple(bases.shape) if isinstance(bases, torch.Tensor) else type(bases).__name__
            raise ValueError(f"{spec} needs calibrated bases [sources, {spec.rank}, hidden] (tools/calibrate.py), got {got}")
        if not torch.isfinite(bases).all():
            raise ValueError(f"{spec}: the calibrated bases hold non-finite values")
        self.spec = spec
        self.block = BlockCodec(spec.base)
        self.coords = None if spec.coord_spec is None else BlockCodec(spec.coord_spec)
        self.coords_exact_in_bf16 = spec.coord_spec is None or _exact_in_bf16(spec.coord_spec)
        """Whether every coordinate value the decoder reads is a bf16 number (the GPU's bf16 GEMM)."""
        self.kernel_cost = self.LOWRANK_KERNEL_COST * self.block.kernel_cost
        self.bases = bases.to(torch.bfloat16).float().contiguous()  # see the module docstring
        self._on_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # copies, made once each

    def parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.bases,)

    @property
    def hidden(self) -> int:
        return self.bases.shape[2]

    def _bases_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The bases on `device` as `dtype` (float32, or bf16 for the GPU's bf16 GEMM: the same
        values, the bases being bf16-rounded), converted once."""
        key = (torch.device(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = self.bases.to(device=device, dtype=dtype)
        return self._on_device[key]

    def _index(self, source: int) -> int:
        if not -1 <= source < self.bases.shape[0] - 1:
            raise ValueError(f"{self.spec}: source {source} is not one of the {self.bases.shape[0] - 1} calibrated ranks")
        return source

    def basis(self, source: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`[K, hidden]` directions of `source` (a rank, or -1 = `REDUCED`)."""
        return self._bases_on(device, dtype)[self._index(source)]

    def source_bases(self, sources: Sequence[int], device: torch.device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`[n, K, hidden]` directions of each source in order."""
        idx = [self._index(int(s)) % self.bases.shape[0] for s in sources]
        b = self._bases_on(device, dtype)
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
        resid = x.float() - lowrank_sum(coef[None], basis[None])
        return torch.cat([self.block.encode(resid), tail], dim=1)

    def decode_f32(self, payload: torch.Tensor, hidden: int, *, source: int = 0) -> torch.Tensor:
        n = self.data_bytes(hidden)
        v = self.block.decode_f32(payload[:, :n], hidden)
        return v + lowrank_sum(self.coordinate_values(payload[:, n:])[None], self.basis(source, payload.device)[None])

    def decode_sum_f32(self, payloads: torch.Tensor, hidden: int, sources: Sequence[int] | None = None) -> torch.Tensor:
        """The block parts summed in index order from +0.0, then every source's low-rank part
        added as one matmul (`lowrank_sum`)."""
        sources = range(payloads.shape[0]) if sources is None else sources
        n = self.data_bytes(hidden)
        acc = torch.zeros(payloads.shape[1], hidden, dtype=torch.float32, device=payloads.device)
        for p in payloads:
            acc = acc + self.block.decode_f32(p[:, :n], hidden)
        coefs = torch.stack([self.coordinate_values(p[:, n:]) for p in payloads])
        return acc + lowrank_sum(coefs, self.source_bases(sources, payloads.device))
