"""Tile <-> payload bytes: element codes, block scales and bf16 slots (Triton device functions).

A tile is `[R, T]` elements: R rows starting at the byte offsets `row_off` ([R, 1]) of a payload,
columns `col0 .. col0 + T` of a row of `hidden` values. Layouts are those of
`tpcomp_megatron.codecs.formats.pack_codes` and the codecs' docstrings:

* 8 bits: one code per byte.
* 4 bits: element 2i in the low nibble of byte i.
* 5 / 6 bits: the low-nibble plane of the row (as 4 bits, `hidden / 2` bytes), then the plane of
  the top 1 / 2 bits (8 / 4 fields per byte).
* 3 bits: the plane of the low 2 bits (4 fields per byte, `hidden / 4` bytes), then the plane
  of the top bit (8 per byte).
  In both, a tile's slice of each plane is contiguous and a byte's fields are adjacent
  elements, which one thread holds: no cross-thread traffic.
* scales after the `data_bytes` of codes: one byte (E8M0) or two (bf16, little-endian) per block.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .numerics import _SUM


@triton.jit
def _store_plane(ptr, plane_off, row_mask, col0, hidden, fields, R: tl.constexpr, T: tl.constexpr,
                 W: tl.constexpr):
    """Store fields [R, T] of W bits (1 or 2) into the plane at byte offsets
    `plane_off` ([R, 1]): 8 // W fields per byte, summed (disjoint bits) within a thread."""
    P: tl.constexpr = 8 // W
    packed = tl.reshape(fields, [R, T // P, P]) << (W * tl.arange(0, P))[None, None, :]
    h = col0 // P + tl.arange(0, T // P)[None, :]
    tl.store(ptr + plane_off + h, tl.reduce(packed, 2, _SUM).to(tl.uint8), mask=row_mask & (h < hidden // P))


@triton.jit
def _load_plane(ptr, plane_off, row_mask, col0, hidden, R: tl.constexpr, T: tl.constexpr, W: tl.constexpr):
    """Inverse of `_store_plane` -> int32 fields [R, T] (0 outside the row)."""
    P: tl.constexpr = 8 // W
    h = col0 // P + tl.arange(0, T // P)[None, :]
    t = tl.load(ptr + plane_off + h, mask=row_mask & (h < hidden // P), other=0).to(tl.int32)
    return tl.reshape((t[:, :, None] >> (W * tl.arange(0, P))[None, None, :]) & ((1 << W) - 1), [R, T])


@triton.jit
def _store_codes(ptr, row_off, row_mask, col0, hidden, codes, R: tl.constexpr, T: tl.constexpr,
                 BITS: tl.constexpr, NARROW: tl.constexpr = False):
    """Pack int32 codes [R, T] and store them (columns >= hidden are dropped). NARROW: as in
    `_load_codes`."""
    if BITS == 8:
        cols = col0 + tl.arange(0, T)[None, :]
        tl.store(ptr + row_off + cols, codes.to(tl.uint8), mask=row_mask & (cols < hidden))
    elif BITS == 3:  # a plane of the low 2 bits, then a plane of the top bit
        _store_plane(ptr, row_off, row_mask, col0, hidden, codes & 3, R, T, 2)
        _store_plane(ptr, row_off + hidden // 4, row_mask, col0, hidden, codes >> 2, R, T, 1)
    else:
        lo, hi = tl.split(tl.reshape(codes & 15, [R, T // 2, 2]))
        j = col0 // 2 + tl.arange(0, T // 2)[None, :]
        offs = row_off + j
        if NARROW:
            offs = tl.max_contiguous(offs, [1, 2])
        tl.store(ptr + offs, (lo | (hi << 4)).to(tl.uint8), mask=row_mask & (j < hidden // 2))
        if BITS > 4:  # the high plane: the top BITS - 4 bits
            _store_plane(ptr, row_off + hidden // 2, row_mask, col0, hidden, codes >> 4, R, T, BITS - 4)


@triton.jit
def _load_codes(ptr, row_off, row_mask, col0, hidden, R: tl.constexpr, T: tl.constexpr,
                BITS: tl.constexpr, NARROW: tl.constexpr = False):
    """Load and unpack codes of a tile -> int32 [R, T] (0 outside the row). NARROW (4 bits):
    2 bytes per access, the 4 elements of the float32 tables the static codec reads beside them
    (both then share a layout; wide accesses would send the codes through shared memory)."""
    if BITS == 8:
        cols = col0 + tl.arange(0, T)[None, :]
        return tl.load(ptr + row_off + cols, mask=row_mask & (cols < hidden), other=0).to(tl.int32)
    if BITS == 3:
        return (_load_plane(ptr, row_off, row_mask, col0, hidden, R, T, 2)
                | (_load_plane(ptr, row_off + hidden // 4, row_mask, col0, hidden, R, T, 1) << 2))
    j = col0 // 2 + tl.arange(0, T // 2)[None, :]
    offs = row_off + j
    if NARROW:
        offs = tl.max_contiguous(offs, [1, 2])
    b = tl.load(ptr + offs, mask=row_mask & (j < hidden // 2), other=0).to(tl.int32)
    codes = tl.reshape(tl.join(b & 15, b >> 4), [R, T])
    if BITS > 4:
        codes = codes | (_load_plane(ptr, row_off + hidden // 2, row_mask, col0, hidden, R, T, BITS - 4) << 4)
    return codes


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
def _store_delta_scales(ptr, row_off, row_mask, col0, hidden, data_bytes, group, delta, R: tl.constexpr,
                        T: tl.constexpr, B: tl.constexpr, G: tl.constexpr):
    """e6m2d: store the tile's group bytes [R, T // G] and its deltas [R, T // B], two per byte
    (the even block in the low nibble), after the row's group bytes."""
    NG: tl.constexpr = T // G
    NBT: tl.constexpr = T // B
    g = col0 // G + tl.arange(0, NG)[None, :]
    tl.store(ptr + row_off + data_bytes + g, group.to(tl.uint8), mask=row_mask & (g < hidden // G))
    lo, hi = tl.split(tl.reshape(delta, [R, NBT // 2, 2]))
    j = col0 // B // 2 + tl.arange(0, NBT // 2)[None, :]
    tl.store(ptr + row_off + data_bytes + hidden // G + j, (lo | (hi << 4)).to(tl.uint8),
             mask=row_mask & (j < hidden // B // 2))


@triton.jit
def _load_delta_scales(ptr, row_off, row_mask, col0, hidden, data_bytes, R: tl.constexpr,
                       T: tl.constexpr, B: tl.constexpr, G: tl.constexpr, NAN_MARK: tl.constexpr):
    """e6m2d: the E6M2 bytes [R, T // B] (int32) the tile's group bytes and deltas give; a
    delta of NAN_MARK gives 0xFF."""
    NG: tl.constexpr = T // G
    NBT: tl.constexpr = T // B
    g = col0 // G + tl.arange(0, NG)[None, :]
    group = tl.load(ptr + row_off + data_bytes + g, mask=row_mask & (g < hidden // G), other=0).to(tl.int32)
    j = col0 // B // 2 + tl.arange(0, NBT // 2)[None, :]
    packed = tl.load(ptr + row_off + data_bytes + hidden // G + j, mask=row_mask & (j < hidden // B // 2),
                     other=0).to(tl.int32)
    delta = tl.reshape(tl.join(packed & 0xF, packed >> 4), [R, NBT])
    spread = tl.reshape(tl.broadcast_to(group[:, :, None], [R, NG, G // B]), [R, NBT])
    return tl.where(delta == NAN_MARK, 0xFF, tl.maximum(spread - delta, 0))


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
