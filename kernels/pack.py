"""Tile <-> payload bytes: element codes, block scales and bf16 slots (Triton device functions).

A tile is `[R, T]` elements: R rows starting at the byte offsets `row_off` ([R, 1]) of a payload,
columns `col0 .. col0 + T` of a row of `hidden` values. Layouts are those of
`tpcomp_megatron.codecs.formats.pack_codes` and the codecs' docstrings:

* 8 bits: one code per byte.
* 4 bits: element 2i in the low nibble of byte i.
* 5 / 6 bits: each group of 8 codes is a little-endian bit string of 5 / 6 bytes. The only place
  the kernels use int64: a group (40 / 48 bits) is assembled in one integer, in one thread.
* scales after the `data_bytes` of codes: one byte (E8M0) or two (bf16, little-endian) per block.
"""

from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def _split8(x, R: tl.constexpr, G: tl.constexpr):
    """[R, G * 8] (or [R, G, 8]) -> the 8 tensors [R, G] of group positions 0..7. Successive
    splits keep a group's 8 values in one thread: packing needs no cross-thread traffic."""
    e, o = tl.split(tl.reshape(x, [R, G, 2, 2, 2]))  # last axis = bit 0 of the position
    e0, e1 = tl.split(e)
    o0, o1 = tl.split(o)
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7, R: tl.constexpr, G: tl.constexpr):
    """Inverse of `_split8`: 8 tensors [R, G] -> [R, G, 8]."""
    j = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    return tl.reshape(j, [R, G, 8])


@triton.jit
def _store_codes(ptr, row_off, row_mask, col0, hidden, codes, R: tl.constexpr, T: tl.constexpr,
                 BITS: tl.constexpr):
    """Pack int32 codes [R, T] and store them (columns >= hidden are dropped)."""
    if BITS == 8:
        cols = col0 + tl.arange(0, T)[None, :]
        tl.store(ptr + row_off + cols, codes.to(tl.uint8), mask=row_mask & (cols < hidden))
    elif BITS == 4:
        lo, hi = tl.split(tl.reshape(codes, [R, T // 2, 2]))
        j = col0 // 2 + tl.arange(0, T // 2)[None, :]
        tl.store(ptr + row_off + j, (lo | (hi << 4)).to(tl.uint8), mask=row_mask & (j < hidden // 2))
    else:
        c0, c1, c2, c3, c4, c5, c6, c7 = _split8(codes.to(tl.int64), R, T // 8)
        w = (c0 | (c1 << BITS) | (c2 << 2 * BITS) | (c3 << 3 * BITS) | (c4 << 4 * BITS)
             | (c5 << 5 * BITS) | (c6 << 6 * BITS) | (c7 << 7 * BITS))
        top = (w >> 40) & 0xFF if BITS == 6 else w * 0  # byte 5 exists for 6 bits only
        b = _join8(w & 0xFF, (w >> 8) & 0xFF, (w >> 16) & 0xFF, (w >> 24) & 0xFF, (w >> 32) & 0xFF,
                   top, w * 0, w * 0, R, T // 8)
        g = col0 // 8 + tl.arange(0, T // 8)
        k = tl.arange(0, 8)
        offs = row_off[:, :, None] + (g * BITS)[None, :, None] + k[None, None, :]
        mask = row_mask[:, :, None] & (g < hidden // 8)[None, :, None] & (k < BITS)[None, None, :]
        tl.store(ptr + offs, b.to(tl.uint8), mask=mask)


@triton.jit
def _load_codes(ptr, row_off, row_mask, col0, hidden, R: tl.constexpr, T: tl.constexpr,
                BITS: tl.constexpr):
    """Load and unpack codes of a tile -> int32 [R, T] (0 outside the row)."""
    if BITS == 8:
        cols = col0 + tl.arange(0, T)[None, :]
        return tl.load(ptr + row_off + cols, mask=row_mask & (cols < hidden), other=0).to(tl.int32)
    elif BITS == 4:
        j = col0 // 2 + tl.arange(0, T // 2)[None, :]
        b = tl.load(ptr + row_off + j, mask=row_mask & (j < hidden // 2), other=0).to(tl.int32)
        return tl.reshape(tl.join(b & 15, b >> 4), [R, T])
    else:
        k = tl.arange(0, 8)
        g = col0 // 8 + tl.arange(0, T // 8)
        offs = row_off[:, :, None] + (g * BITS)[None, :, None] + k[None, None, :]
        mask = row_mask[:, :, None] & (g < hidden // 8)[None, :, None] & (k < BITS)[None, None, :]
        b0, b1, b2, b3, b4, b5, b6, b7 = _split8(tl.load(ptr + offs, mask=mask, other=0).to(tl.int64), R, T // 8)
        w = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24) | (b4 << 32) | (b5 << 40)  # b5 is 0 for 5 bits
        M: tl.constexpr = (1 << BITS) - 1
        c = _join8(w & M, (w >> BITS) & M, (w >> 2 * BITS) & M, (w >> 3 * BITS) & M, (w >> 4 * BITS) & M,
                   (w >> 5 * BITS) & M, (w >> 6 * BITS) & M, (w >> 7 * BITS) & M, R, T // 8)
        return tl.reshape(c.to(tl.int32), [R, T])


@triton.jit
def _store_scales(ptr, row_off, row_mask, col0, hidden, data_bytes, stored, R: tl.constexpr,
                  T: tl.constexpr, B: tl.constexpr, SB: tl.constexpr):
    """Store the scale bits [R, T // B] (int32) of the tile's blocks."""
    NBT: tl.constexpr = T // B
    if SB == 1:
        blk = col0 // B + tl.arange(0, NBT)[None, :]
        tl.store(ptr + row_off + data_bytes + blk, stored.to(tl.uint8),
                 mask=row_mask & (blk < hidden // B))
    else:
        pair = tl.reshape(tl.join(stored & 0xFF, stored >> 8), [R, 2 * NBT])
        j = 2 * (col0 // B) + tl.arange(0, 2 * NBT)[None, :]
        tl.store(ptr + row_off + data_bytes + j, pair.to(tl.uint8),
                 mask=row_mask & (j < 2 * (hidden // B)))


@triton.jit
def _load_scales(ptr, row_off, row_mask, col0, hidden, data_bytes, R: tl.constexpr,
                 T: tl.constexpr, B: tl.constexpr, SB: tl.constexpr):
    """Load the scale bits of the tile's blocks -> int32 [R, T // B]."""
    NBT: tl.constexpr = T // B
    if SB == 1:
        blk = col0 // B + tl.arange(0, NBT)[None, :]
        return tl.load(ptr + row_off + data_bytes + blk, mask=row_mask & (blk < hidden // B),
                       other=0).to(tl.int32)
    else:
        j = 2 * (col0 // B) + tl.arange(0, 2 * NBT)[None, :]
        b = tl.load(ptr + row_off + data_bytes + j, mask=row_mask & (j < 2 * (hidden // B)),
                    other=0).to(tl.int32)
        lo, hi = tl.split(tl.reshape(b, [R, NBT, 2]))
        return lo | (hi << 8)


@triton.jit
def _store_bf16_slots(ptr, offs, bits, mask, EVEN: tl.constexpr):
    """Store bf16 bit patterns (int32) as little-endian 16-bit values at byte offsets `offs`.
    Outlier slots follow an arbitrary number of code bytes: unless the launcher saw that every
    slot offset is even (EVEN), they are written as two bytes."""
    if EVEN:
        tl.store((ptr + offs).to(tl.pointer_type(tl.int16)), bits.to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, (bits & 0xFF).to(tl.uint8), mask=mask)
        tl.store(ptr + offs + 1, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _load_bf16_slots(ptr, offs, mask, EVEN: tl.constexpr):
    """Load little-endian 16-bit values at byte offsets `offs` -> bf16 bit patterns (int32 in
    0..0xFFFF, 0 where masked)."""
    if EVEN:
        v = tl.load((ptr + offs).to(tl.pointer_type(tl.int16)), mask=mask, other=0)
        return v.to(tl.int32) & 0xFFFF
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.int32)
    return lo | (hi << 8)
