"""Element formats of the block codecs and their reference (pure PyTorch, float32) arithmetic.

Every format stores a value as a sign-magnitude code of `bits` bits: the top bit is the sign
(set when the input is < 0, so -0.0 encodes as +0), the other bits are the magnitude code.

* Floating-point formats (E`e`M`m`, bias 2**(e-1)-1, no infinities): magnitude code
  `c = exp_field << m | mantissa`; exp_field 0 is subnormal. Every code is a finite value except
  in FP8 E4M3, whose all-ones code (0x7F) is NaN and is never produced (saturation stops at 448).
* Integer formats: symmetric, magnitude code = |round(v)| clamped to 2**(bits-1)-1 (INT4: -7..7).
* Codebook formats (`lloyd3`, `lloyd4`, `lloyd5`): magnitude code k stands for the k-th of
  2**(bits-1) fixed levels; a value takes the code of the nearest level (the number of midpoints
  between consecutive levels that lie strictly below |v|: a tie goes to the lower level), so NaN
  gets code 0 and Inf the top level. See `LLOYD_LEVELS`.

For floating-point and integer formats, rounding is round-to-nearest, ties to even, and
saturating. Quantization works on a value `v` that the caller already divided by the block
scale. The magnitude code has a closed form for all floating-point formats: with
`e = max(floor(log2|v|), emin)`, `q = rne(|v| * 2**(m-e))`, `code = (e - emin) * 2**m + q`,
capped at the largest finite code. (A `q` that rounds up to 2**(m+1) lands exactly on the first
code of the next binade, so no special case is needed.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


LLOYD_LEVELS: dict[str, tuple[int, ...]] = {
    "lloyd3": (299, 1400, 2657, 4096),
    "lloyd4": (146, 590, 1097, 1636, 2192, 2767, 3412, 4096),
    "lloyd5": (55, 183, 332, 497, 669, 845, 1025, 1212, 1412, 1633, 1887, 2180, 2538, 2977, 3536, 4096),
}
"""Magnitude levels x 4096 of the codebook formats: Lloyd-Max quantizers (minimum squared error)
of block-normalized row-parallel partial sums. Fitted with E6M2 block scales of 32 values
(the scale maps a block's maximum to the top level, 1.0) on SmolLM2-135M and Gemma 3 270M at
TP=8, on the calibration text (the 1901 State of the Union), each rank's partial sums with and
without their rank-4 low-rank part, every layer normalized to unit RMS and pooled. Then rounded
to multiples of 2**-12, so that every level and every midpoint is exact in float32
(tools/fit_codebook.py does all this and reproduces these values exactly). No level is
zero: a sign and 4 (8, 16) magnitudes spend all 8 (16, 32) codes, where FP4 E2M1 spends two on
+-0. On the lowrank r4 residuals that gains 0.8-1.1 dB of SNR over E2M1 at the same 4 bits
(benchmarks/results/quality_cpu-amd-epyc_2026-11-23.md, "Codebook elements"); lloyd3, 3 bits
for the least sensitive layers of a bit allocation, is 6.4 dB below lloyd4 and 2.0 dB above INT3."""


@dataclass(frozen=True)
class ElementFormat:
    """One element format. `emax` is the exponent of the largest value (OCP MX `emax_elem`)."""

    name: str
    bits: int
    ebits: int = 0  # 0 for integer and codebook formats
    mbits: int = 0
    levels: tuple[float, ...] = ()
    """Codebook formats: the 2**(bits-1) magnitudes, ascending (empty for the others)."""

    def __post_init__(self) -> None:
        if self.levels and (len(self.levels) != 1 << (self.bits - 1) or list(self.levels) != sorted(set(self.levels))
                            or self.levels[0] < 0):
            raise ValueError(f"{self.name}: a codebook needs {1 << (self.bits - 1)} distinct ascending levels >= 0")

    @property
    def is_int(self) -> bool:
        return self.ebits == 0 and not self.levels

    @property
    def is_codebook(self) -> bool:
        return bool(self.levels)

    @property
    def midpoints(self) -> tuple[float, ...]:
        """Codebook formats: the decision thresholds between consecutive levels."""
        return tuple((a + b) / 2 for a, b in zip(self.levels, self.levels[1:]))

    @property
    def bias(self) -> int:
        """Exponent bias (0 for integer and codebook formats)."""
        return (1 << (self.ebits - 1)) - 1 if self.ebits else 0

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (also the exponent step of subnormals)."""
        return 1 - self.bias

    @property
    def max_code(self) -> int:
        """Largest magnitude code that is a finite value."""
        top = (1 << (self.bits - 1)) - 1
        if self.is_int:
            return top
        return top - 1 if self.name == "fp8_e4m3" else top

    @property
    def max_value(self) -> float:
        return float(self.code_to_value(torch.tensor([self.max_code]))[0])

    @property
    def emax(self) -> int:
        """floor(log2(max_value)): OCP MX shared-exponent rule uses floor(log2 amax) - emax."""
        return int(torch.tensor(self.max_value).log2().floor())

    def code_to_value(self, mag: torch.Tensor) -> torch.Tensor:
        """Magnitude code (integer tensor) -> non-negative float32 value."""
        mag = mag.to(torch.int32)
        if self.is_codebook:
            return torch.tensor(self.levels, dtype=torch.float32, device=mag.device)[mag.long()]
        if self.is_int:
            return mag.to(torch.float32)
        exp_field = mag >> self.mbits
        mant = (mag & ((1 << self.mbits) - 1)).to(torch.float32)
        normal = exp_field > 0
        significand = torch.where(normal, mant + (1 << self.mbits), mant)
        exp = torch.where(normal, exp_field, torch.ones_like(exp_field)) - self.bias - self.mbits
        return torch.ldexp(significand, exp.to(torch.float32))

    def value_to_code(self, v: torch.Tensor) -> torch.Tensor:
        """float32 values (already divided by the scale) -> sign-magnitude codes as uint8."""
        v = v.to(torch.float32)
        a = v.abs()
        if self.is_codebook:
            mids = torch.tensor(self.midpoints, dtype=torch.float32, device=v.device)
            mag = (a.unsqueeze(-1) > mids).sum(-1).to(torch.float32)  # NaN: 0; +-Inf: the top level
        elif self.is_int:
            mag = torch.round(a).clamp(max=self.max_code)  # torch.round is ties-to-even
        else:
            # frexp: a = f * 2**k with f in [0.5, 1), so floor(log2 a) = k - 1 (exact, no log2).
            _, k = torch.frexp(a)
            # frexp(0) gives k = 0; zero belongs to the subnormal binade (e = emin).
            e = torch.where(a > 0, k.to(torch.int32) - 1, self.emin).clamp(min=self.emin)
            q = torch.round(torch.ldexp(a, (self.mbits - e).to(torch.float32)))
            mag = ((e - self.emin) << self.mbits).to(torch.float32) + q
            mag = mag.clamp(max=self.max_code)
        mag = torch.nan_to_num(mag, nan=0.0).to(torch.int32)  # non-finite blocks are masked by the caller
        sign = (v < 0).to(torch.int32) << (self.bits - 1)
        return (sign | mag).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Sign-magnitude codes -> signed float32 values."""
        codes = codes.to(torch.int32)
        mag = self.code_to_value(codes & ((1 << (self.bits - 1)) - 1))
        return torch.where((codes >> (self.bits - 1)) & 1 == 1, -mag, mag)


FORMATS: dict[str, ElementFormat] = {
    f.name: f
    for f in (
        ElementFormat("fp4_e2m1", 4, 2, 1),
        ElementFormat("fp5_e2m2", 5, 2, 2),
        ElementFormat("fp5_e3m1", 5, 3, 1),
        ElementFormat("fp6_e2m3", 6, 2, 3),
        ElementFormat("fp6_e3m2", 6, 3, 2),
        ElementFormat("fp8_e4m3", 8, 4, 3),
        ElementFormat("int4", 4),
        ElementFormat("int8", 8),
        *(ElementFormat(name, len(lv).bit_length(), levels=tuple(v / 4096 for v in lv))
          for name, lv in LLOYD_LEVELS.items()),
    )
}


def _pack_fields(fields: torch.Tensor, width: int) -> torch.Tensor:
    """`[rows, n]` fields of `width` bits (1, 2 or 4) -> `[rows, n * width // 8]` bytes, field i
    of a byte in bits [i * width, (i + 1) * width) (little-endian within the byte)."""
    rows, n = fields.shape
    per = 8 // width
    shifts = torch.arange(per, device=fields.device, dtype=torch.int32) * width
    packed = (fields.to(torch.int32).reshape(rows, n // per, per) << shifts).sum(dim=-1)  # disjoint: sum == or
    return packed.to(torch.uint8)


def _unpack_fields(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of `_pack_fields` -> `[rows, n]` int32."""
    per = 8 // width
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * width
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(packed.shape[0], n)


def code_planes(bits: int) -> tuple[int, ...]:
    """Field widths of the bit planes a row of `bits`-bit codes is stored in, low bits first:
    8 -> (8,), 4 -> (4,), 5 / 6 -> (4, 1) / (4, 2), 3 -> (2, 1). Every width is a power of two,
    so a byte holds whole fields of adjacent elements."""
    if bits in (4, 8):
        return (bits,)
    if bits in (5, 6):
        return (4, bits - 4)
    if bits == 3:
        return (2, 1)
    raise ValueError(f"no packing for {bits}-bit codes (3, 4, 5, 6 or 8)")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `[rows, n]` codes of `bits` bits into `[rows, n * bits // 8]` bytes.

    8 bits: one code per byte. 4 bits: code 2i in the low nibble of byte i. 3, 5 and 6 bits: two
    bit planes (as FP6-LLM's bit-level pre-packing), each a power-of-two field width a GPU thread
    packs and unpacks within its registers (`code_planes`): first the low 4 (3 bits: 2) bits of
    every code (n / 2, resp. n / 4 bytes), then the top 1 / 2 (3 bits: 1) bits of every code
    (8 / 4 per byte, n / 8 or n / 4 bytes). `n` must be a multiple of 8 (every block size is).
    """
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if n % 8:
        raise ValueError(f"codes per row must be a multiple of 8, got {n}")
    codes = codes.to(torch.int32)
    planes, shift = [], 0
    for width in code_planes(bits):
        planes.append(_pack_fields((codes >> shift) & ((1 << width) - 1), width))
        shift += width
    return torch.cat(planes, dim=1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: `[rows, n * bits // 8]` bytes -> `[rows, n]` codes (uint8)."""
    if bits == 8:
        return packed
    codes, shift, start = 0, 0, 0
    for width in code_planes(bits):
        size = n * width // 8
        codes = codes | (_unpack_fields(packed[:, start:start + size], width, n) << shift)
        shift, start = shift + width, start + size
    return codes.to(torch.uint8)
