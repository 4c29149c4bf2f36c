"""Block ("microscaling") codec after arXiv 2411.09510 and the OCP MX spec: reference implementation.

Row payload layout, `hidden = nb * B` values in `nb` blocks of `B`:

    [ element codes: hidden * bits / 8 bytes, packed as formats.pack_codes ]
    [ scales: nb x (1 byte E8M0 / E6M2 | 2 bytes bf16, little-endian), or for e6m2d
      hidden / 128 group bytes then nb / 2 delta bytes ]

Scales:
* E8M0 (OCP MX): shared exponent `s = floor(log2 amax) - emax_elem`, clamped to [-127, 127],
  stored as `s + 127`; the block scale is 2**s. A zero block stores 0 (its codes are all zero).
  The OCP rule maps the block maximum into [2**emax, 2**(emax+1)), above the largest code for
  every format but INT8 (FP4: (6, 8) saturates to 6), so the largest values of a block, the ones
  that matter most in a partial sum with outliers, lose up to 25%.
* E8M0-up (`e8m0up`): the same byte, with `s` rounded up by one where `amax > max_value * 2**s`,
  so that nothing saturates (the smallest power of two that fits, as DeepSeek-V3's UE8M0 scales
  and NVIDIA's MXFP8 recipe do); costs up to one binade of resolution for small values.
* E6M2 (`e6m2`): an unsigned 8-bit float scale, 6 exponent bits (bias 32) and 2 mantissa bits,
  byte `s` -> `2**((s >> 2) - 32) * (1 + (s & 3) / 4)`, 255 = NaN. `amax * r` (float32, `r` the
  float32 nearest 1 / max_value: a multiply, so kernels divide nothing per block) is rounded to
  the nearest scale (ties to even), clamped to [2**-32, 1.5 * 2**31];
  values the rounding puts above the largest code (by up to 12.5%) saturate, as with bf16. The
  idea of NVFP4's E4M3 scales (a scale finer than a power of two: the block maximum lands within
  12.5% of the largest code, not within 2x) without NVFP4's per-tensor second-level scale, which
  would need a pass over the whole tensor before quantizing: 64 binades cover any partial sum
  (blocks whose maximum is below 6e-10 * max_value / 6 quantize to zero). Quantizing uses
  `inv = 1 / scale` as bf16 does.
* E6M2 deltas (`e6m2d`): the E6M2 scale of every block, stored as a 4-bit delta `d` below the
  largest E6M2 byte `G` of its group of 128 values (one byte per group): the block's byte is
  `G - d`, d in [0, 14], so a block within 3.5 binades of its group's largest keeps exactly its
  E6M2 scale; one further below takes byte `G - 14`, a larger scale (it saturates nothing and
  loses resolution only on values that small). 4 + 8 / 128 scale bits per block of 32 instead of
  8: 0.19 bits per value, not 0.25. Delta 15 marks a non-finite block. Layout after the codes:
  the group bytes, then the deltas, two per byte (the even block in the low nibble).
* bf16: `scale = bf16(amax / max_value)`, round to nearest even; the inverse used to quantize is
  the float32 IEEE quotient `1 / scale` (so `x * inv` is the only rounding before the element
  rounding). A zero (or underflowed) scale encodes the block as zeros.

NaN/Inf policy: a block holding any NaN or +-Inf gets the NaN scale (E8M0 / E6M2 0xFF, bf16 0x7FC0) and
zero codes, and decodes to NaN across that block only. Other blocks, and other rows, are
unaffected: a non-finite value never reaches another block's scale.
"""

from __future__ import annotations

import torch

from .base import Codec
from .formats import FORMATS, pack_codes, unpack_codes
from .spec import DELTA_GROUP, E8M0_SCALES, SCALE_BITS, BlockSpec

E8M0_NAN = 0xFF
BF16_NAN_BITS = 0x7FC0
E6M2_NAN = 0xFF
E6M2_BIAS = 32
E6M2_MAX = 0xFE  # 1.5 * 2**31
DELTA_MAX = 14
DELTA_NAN = 0xF


def e6m2_value(stored: torch.Tensor) -> torch.Tensor:
    """E6M2 scale bytes (int32) -> float32 scales (NaN for 0xFF); every one a float32 normal."""
    s = stored.to(torch.int32)
    scale = torch.ldexp(1.0 + (s & 3).to(torch.float32) / 4, ((s >> 2) - E6M2_BIAS).to(torch.float32))
    return torch.where(s == E6M2_NAN, float("nan"), scale)


def e6m2_round(q: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 -> the E6M2 byte of the nearest scale (ties to even),
    clamped to [0, E6M2_MAX] (a zero or tiny q gives byte 0, scale 2**-32)."""
    bits = q.view(torch.int32)
    near = (bits + 0xFFFFF + ((bits >> 21) & 1)) & ~0x1FFFFF  # mantissa to 2 bits; a carry bumps the exponent
    e = (near >> 23) - 127 + E6M2_BIAS
    s = (e << 2) | ((near >> 21) & 3)
    return torch.where(e < 0, 0, torch.clamp(s, max=E6M2_MAX))


CODEBOOK_KERNEL_COST = {"lloyd3": 2.8, "lloyd4": 3.3, "lloyd5": 5.5}
"""encode + decode_sum GPU time against fp4_e2m1 / fp5_e2m2 of the same block and scale (8 sources,
128 MB; H100, benchmarks/results/kernels_lloyd_h100_2026-11-24.md; lloyd3 on an H200,
kernels_lloyd3_h200_2026-12-06.md, where lloyd4 measured 3.5): the codebook decode is a chain of
selects per value, where a float format decodes with a shift and a multiply."""


DELTA_KERNEL_COST = 1.2
"""e6m2d against e6m2, encode + decode_sum (H100, 8 sources, 8-128 MB; FP4: 1.12-1.17x, lloyd4:
1.03-1.08x; benchmarks/results/kernels_e6m2d_h100_2026-12-06.md)."""


class BlockCodec(Codec):
    def __init__(self, spec: BlockSpec):
        self.spec = spec
        self.fmt = FORMATS[spec.element]
        self.scale_bytes = max(1, SCALE_BITS[spec.scale] // 8)  # per block (e6m2d: see scale_row_bytes)
        delta_cost = DELTA_KERNEL_COST if spec.scale == "e6m2d" else 1.0
        self.kernel_cost = CODEBOOK_KERNEL_COST.get(spec.element, 1.0) * delta_cost

    def ineligible(self, hidden: int) -> str | None:
        if hidden % self.spec.unit:
            what = "e6m2d group" if self.spec.unit != self.spec.block else "block"
            return f"hidden size {hidden} is not a multiple of the {what} size {self.spec.unit}"
        return None

    def data_bytes(self, hidden: int) -> int:
        return hidden * self.fmt.bits // 8

    def scale_row_bytes(self, hidden: int) -> int:
        nb = hidden // self.spec.block
        if self.spec.scale == "e6m2d":
            return hidden // DELTA_GROUP + nb // 2
        return nb * self.scale_bytes

    def row_bytes(self, hidden: int) -> int:
        return self.data_bytes(hidden) + self.scale_row_bytes(hidden)

    def bits_per_value(self, hidden: int) -> float:
        return self.spec.bits_per_value()

    # -- scales -------------------------------------------------------------------------------
    def _scales(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """blocks [rows, nb, B] float32 -> (stored scale bytes [rows, nb, sb], inverse scale
        float32 [rows, nb], non-finite mask [rows, nb])."""
        bad = ~torch.isfinite(blocks).all(dim=-1)
        amax = torch.where(bad, 0.0, blocks.abs().amax(dim=-1))
        if self.spec.scale in E8M0_SCALES:
            _, k = torch.frexp(amax)
            s = k.to(torch.int32) - 1 - self.fmt.emax
            if self.spec.scale == "e8m0up":  # exact: max_value * 2**s is a float32 for normal amax
                limit = torch.ldexp(torch.full_like(amax, self.fmt.max_value), s.to(torch.float32))
                s = s + (amax > limit).to(torch.int32)
            s = s.clamp(-127, 127)
            s = torch.where(amax > 0, s, -127)
            inv = torch.ldexp(torch.ones_like(amax), (-s).to(torch.float32))
            stored = torch.where(bad, E8M0_NAN, s + 127).to(torch.uint8).unsqueeze(-1)
        elif self.spec.scale in ("e6m2", "e6m2d"):
            s = e6m2_round(amax * torch.tensor(1.0 / self.fmt.max_value, dtype=torch.float32))
            if self.spec.scale == "e6m2":
                inv = 1.0 / e6m2_value(s)
                stored = torch.where(bad, E6M2_NAN, s).to(torch.uint8).unsqueeze(-1)
            else:  # each block's byte as a delta below its group's largest
                rows, nb = s.shape
                per = DELTA_GROUP // self.spec.block
                group = torch.where(bad, 0, s).reshape(rows, nb // per, per).amax(-1)
                spread = group.repeat_interleave(per, dim=1)
                delta = (spread - s).clamp(0, DELTA_MAX)
                inv = 1.0 / e6m2_value(spread - delta)
                delta = torch.where(bad, DELTA_NAN, delta)
                stored = torch.cat([group, delta[:, 0::2] | (delta[:, 1::2] << 4)], dim=1).to(torch.uint8)
        else:
            scale = (amax / self.fmt.max_value).to(torch.bfloat16).to(torch.float32)
            inv = torch.where(scale > 0, 1.0 / scale, 0.0)
            bits = scale.to(torch.bfloat16).view(torch.int16).to(torch.int32)
            bits = torch.where(bad, BF16_NAN_BITS, bits & 0xFFFF)
            stored = torch.stack([bits & 0xFF, bits >> 8], dim=-1).to(torch.uint8)
        return stored, inv, bad

    def _decode_scales(self, tail: torch.Tensor, nb: int) -> torch.Tensor:
        """The row's scale bytes [rows, scale_row_bytes] uint8 -> float32 scales [rows, nb] (NaN
        for non-finite blocks)."""
        if self.spec.scale == "e6m2d":
            ng = tail.shape[1] - nb // 2
            group = tail[:, :ng].to(torch.int32).repeat_interleave(nb // ng, dim=1)
            packed = tail[:, ng:].to(torch.int32)
            delta = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(tail.shape[0], nb)
            scale = e6m2_value((group - delta).clamp_min(0))
            return torch.where(delta == DELTA_NAN, float("nan"), scale)
        stored = tail.reshape(tail.shape[0], nb, self.scale_bytes)
        if self.spec.scale in E8M0_SCALES:
            e = stored[..., 0].to(torch.int32)
            scale = torch.ldexp(torch.ones_like(e, dtype=torch.float32), (e - 127).to(torch.float32))
            return torch.where(e == E8M0_NAN, float("nan"), scale)
        if self.spec.scale == "e6m2":
            return e6m2_value(stored[..., 0])
        bits = stored[..., 0].to(torch.int32) | (stored[..., 1].to(torch.int32) << 8)
        bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
        return bits.view(torch.bfloat16).to(torch.float32)

    # -- codec --------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, source: int = 0) -> torch.Tensor:
        self.check_input(x)
        rows, hidden = x.shape
        nb, B = hidden // self.spec.block, self.spec.block
        blocks = x.to(torch.float32).reshape(rows, nb, B)
        stored, inv, bad = self._scales(blocks)
        codes = self.fmt.value_to_code(blocks * inv.unsqueeze(-1))
        codes = torch.where(bad.unsqueeze(-1), 0, codes).to(torch.uint8)
        data = pack_codes(codes.reshape(rows, hidden), self.fmt.bits)
        return torch.cat([data, stored.reshape(rows, -1)], dim=1)

    def decode_f32(self, payload: torch.Tensor, hidden: int, *, source: int = 0) -> torch.Tensor:
        rows = payload.shape[0]
        nb, B = hidden // self.spec.block, self.spec.block
        db = self.data_bytes(hidden)
        codes = unpack_codes(payload[:, :db], self.fmt.bits, hidden)
        scales = self._decode_scales(payload[:, db:], nb)
        vals = self.fmt.decode(codes).reshape(rows, nb, B) * scales.unsqueeze(-1)
        return vals.reshape(rows, hidden)
