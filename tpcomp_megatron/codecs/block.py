"""Block ("microscaling") codec after arXiv 2411.09510 and the OCP MX spec: reference implementation.

Row payload layout, `hidden = nb * B` values in `nb` blocks of `B`:

    [ element codes: hidden * bits / 8 bytes, packed as formats.pack_codes ]
    [ scales: nb x (1 byte E8M0 | 2 bytes bf16, little-endian) ]

Scales:
* E8M0 (OCP MX): shared exponent `s = floor(log2 amax) - emax_elem`, clamped to [-127, 127],
  stored as `s + 127`; the block scale is 2**s. A zero block stores 0 (its codes are all zero).
  The OCP rule maps the block maximum into [2**emax, 2**(emax+1)), above the largest code for
  every format but INT8 (FP4: (6, 8) saturates to 6), so the largest values of a block, the ones
  that matter most in a partial sum with outliers, lose up to 25%.
* E8M0-up (`e8m0up`): the same byte, with `s` rounded up by one where `amax > max_value * 2**s`,
  so that nothing saturates (the smallest power of two that fits, as DeepSeek-V3's UE8M0 scales
  and NVIDIA's MXFP8 recipe do); costs up to one binade of resolution for small values.
* bf16: `scale = bf16(amax / max_value)`, round to nearest even; the inverse used to quantize is
  the float32 IEEE quotient `1 / scale` (so `x * inv` is the only rounding before the element
  rounding). A zero (or underflowed) scale encodes the block as zeros.

NaN/Inf policy: a block holding any NaN or +-Inf gets the NaN scale (E8M0 0xFF, bf16 0x7FC0) and
zero codes, and decodes to NaN across that block only. Other blocks, and other rows, are
unaffected: a non-finite value never reaches another block's scale.
"""

from __future__ import annotations

import torch

from .base import Codec
from .formats import FORMATS, pack_codes, unpack_codes
from .spec import E8M0_SCALES, SCALE_BITS, BlockSpec

E8M0_NAN = 0xFF
BF16_NAN_BITS = 0x7FC0


class BlockCodec(Codec):
    def __init__(self, spec: BlockSpec):
        self.spec = spec
        self.fmt = FORMATS[spec.element]
        self.scale_bytes = SCALE_BITS[spec.scale] // 8

    def ineligible(self, hidden: int) -> str | None:
        if hidden % self.spec.block:
            return f"hidden size {hidden} is not a multiple of the block size {self.spec.block}"
        return None

    def data_bytes(self, hidden: int) -> int:
        return hidden * self.fmt.bits // 8

    def row_bytes(self, hidden: int) -> int:
        return self.data_bytes(hidden) + hidden // self.spec.block * self.scale_bytes

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
        else:
            scale = (amax / self.fmt.max_value).to(torch.bfloat16).to(torch.float32)
            inv = torch.where(scale > 0, 1.0 / scale, 0.0)
            bits = scale.to(torch.bfloat16).view(torch.int16).to(torch.int32)
            bits = torch.where(bad, BF16_NAN_BITS, bits & 0xFFFF)
            stored = torch.stack([bits & 0xFF, bits >> 8], dim=-1).to(torch.uint8)
        return stored, inv, bad

    def _decode_scales(self, stored: torch.Tensor) -> torch.Tensor:
        """stored [rows, nb, sb] uint8 -> float32 scales [rows, nb] (NaN for non-finite blocks)."""
        if self.spec.scale in E8M0_SCALES:
            e = stored[..., 0].to(torch.int32)
            scale = torch.ldexp(torch.ones_like(e, dtype=torch.float32), (e - 127).to(torch.float32))
            return torch.where(e == E8M0_NAN, float("nan"), scale)
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
        scales = self._decode_scales(payload[:, db:].reshape(rows, nb, self.scale_bytes))
        vals = self.fmt.decode(codes).reshape(rows, nb, B) * scales.unsqueeze(-1)
        return vals.reshape(rows, hidden)
