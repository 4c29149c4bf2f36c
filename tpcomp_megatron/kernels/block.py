"""Fused kernels of the block ("microscaling") codec and of the hybrid (outliers + block) codec.

Grid: (row tiles, column tiles); a program owns `R` rows x `T` columns, `T // B` whole blocks, so
block scales live in registers and no program depends on another. Input is read once, payload
written once.

Hybrid (`OUTLIERS`, tables in tables.py): channels are ascending, so the outlier slots of a
column tile are one contiguous range, at most KT long. Encode zeroes the outlier channels before
the block scales are taken and copies their values (a [R, KT] gather from cache) into the slots;
decode sums the slots as [R, KT] and overwrites the outlier channels of the output with them, or
(ENCODE) requantizes them into the slots. No per-element gather or scatter.

Low-rank (`LOWRANK`, codecs/lowrank.py): the low-rank part, a float32 [rows, hidden] tensor L
computed beforehand by a GEMM (coordinates times basis; for a sum, all sources' at once), is
subtracted from the tile before its scales are taken (encode), or added to the sum of the block
parts (decode). Same order of float32 operations as the reference.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .launch import (GPU_TILE_ELEMS, LAUNCH_OPTIONS, Launcher, Tiles, choose_tiles, format_constexprs, needs_int64,
                     out_kind_of)
from .numerics import (DELTA_GROUP, DELTA_NAN, SCALE_BF16, SCALE_E6M2, SCALE_E6M2D, SCALE_E8M0, _BF16_NAN_BITS,
                       _bf16_bits, _bf16_bits_to_f32, _bits, _from_bits, _code_to_value, _decode_scales,
                       _delta_scales, _encode_scales, _input_to_f32, _MAX, _store_output, _value_to_code)
from .tables import tile_slots
from .pack import (_load_bf16_slots, _load_codes, _load_delta_scales, _load_scales, _store_bf16_slots, _store_codes,
                   _store_delta_scales, _store_scales)


@triton.jit
def _encode_block_tile(x, out_ptr, row_off, row_mask, col0, hidden, data_bytes,
                       R: tl.constexpr, T: tl.constexpr, B: tl.constexpr, SCALE: tl.constexpr,
                       BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
                       BIAS: tl.constexpr, MAX_CODE: tl.constexpr, EMAX: tl.constexpr,
                       MAXV: tl.constexpr, UP_MANT: tl.constexpr, LEVELS: tl.constexpr):
    """Quantize a float32 tile [R, T] (whole blocks) and store its codes and scales; returns the
    codes [R, T // B, B] and scale bits [R, T // B] as stored (for a decode in registers)."""
    x3 = tl.reshape(x, [R, T // B, B])
    # One integer max of |x|'s bit patterns gives both the block maximum (non-negative floats
    # order as their bits) and the NaN/Inf flag (their patterns are the largest).
    amax_bits = tl.reduce(_bits(x3) & 0x7FFFFFFF, 2, _MAX)
    bad = amax_bits >= 0x7F800000
    amax = tl.where(bad, 0.0, _from_bits(amax_bits))  # a non-finite value never reaches a scale
    if SCALE == SCALE_E6M2D:
        own, _ = _encode_scales(amax, bad, SCALE_E6M2, EMAX, MAXV, UP_MANT)
        group, delta, stored, inv = _delta_scales(own, bad, R, T // B, DELTA_GROUP // B)
    else:
        stored, inv = _encode_scales(amax, bad, SCALE, EMAX, MAXV, UP_MANT)
    codes = _value_to_code(x3 * inv[:, :, None], BITS, EBITS, MBITS, 1 - BIAS,
                           (1 << EBITS) - 1 - BIAS, MAX_CODE, SCALE != SCALE_BF16, SCALE == SCALE_E8M0, LEVELS)
    codes = tl.where(bad[:, :, None], 0, codes)
    _store_codes(out_ptr, row_off, row_mask, col0, hidden, tl.reshape(codes, [R, T]), R, T, BITS)
    if SCALE == SCALE_E6M2D:
        _store_delta_scales(out_ptr, row_off, row_mask, col0, hidden, data_bytes, group, delta, R, T, B, DELTA_GROUP)
    else:
        _store_scales(out_ptr, row_off, row_mask, col0, hidden, data_bytes, stored, R, T, B,
                      2 if SCALE == SCALE_BF16 else 1)
    return codes, stored


@triton.jit
def _decode_block_tile(codes, stored, R: tl.constexpr, T: tl.constexpr, B: tl.constexpr, SCALE: tl.constexpr,
                       BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr, DEC_MUL: tl.constexpr,
                       LEVELS: tl.constexpr):
    """Codes [R, T // B, B] and scale bits [R, T // B] (int32, as loaded) -> values [R, T]."""
    scale = _decode_scales(stored, SCALE)
    v = tl.reshape(_code_to_value(codes, BITS, EBITS, MBITS, DEC_MUL, LEVELS), [R, T // B, B])
    return tl.reshape(v * scale[:, :, None], [R, T])


@triton.jit
def _tile_slots(slot_ptr, first_ptr, col0, c, hidden, T: tl.constexpr, KT: tl.constexpr):
    """Outliers of the column tile: per-column flag [1, T], and the tile's slots, a contiguous
    range (channels are ascending) [j0, j1) of at most KT, as indices [1, KT] and their mask.
    The int16 slot table loads 8 lanes per access, as bf16 data does: one register layout (an
    int32 table forced 4-lane accesses on x, which doubled the per-block scale work per thread:
    +9 instructions per element in the hybrid encode, sm_90 SASS)."""
    is_o = tl.load(slot_ptr + c, mask=c < hidden, other=-1) >= 0
    j0 = tl.load(first_ptr + col0)
    j1 = tl.load(first_ptr + tl.minimum(col0 + T, hidden))
    j = j0 + tl.arange(0, KT)[None, :]
    return is_o, j, j < j1


@triton.jit
def _block_encode_kernel(x_ptr, out_ptr, slot_ptr, first_ptr, chan_ptr, lr_ptr, debt_ptr, rows, hidden,
                         row_bytes, data_bytes, slots_off, LOWRANK: tl.constexpr, FEEDBACK: tl.constexpr,
                         IN_BF16: tl.constexpr, IN_F16: tl.constexpr, OUTLIERS: tl.constexpr,
                         KT: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr, R: tl.constexpr, T: tl.constexpr, B: tl.constexpr,
                         SCALE: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr,
                         MBITS: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr,
                         EMAX: tl.constexpr, MAXV: tl.constexpr, DEC_MUL: tl.constexpr, UP_MANT: tl.constexpr,
                         LEVELS: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)[:, None]
    col0 = tl.program_id(1) * T
    c = col0 + tl.arange(0, T)[None, :]
    row_mask = r < rows
    if I64:
        r = r.to(tl.int64)
    m = row_mask & (c < hidden)
    raw = tl.load(x_ptr + r * hidden + c, mask=m, other=0.0, eviction_policy="evict_first")
    x = _input_to_f32(raw, IN_BF16)
    if FEEDBACK:  # send x + debt (float32)
        x = x + tl.load(debt_ptr + r * hidden + c, mask=m, other=0.0)
    send = x
    row_off = r * row_bytes
    if LOWRANK:  # the residual x - L
        lr = tl.load(lr_ptr + r * hidden + c, mask=m, other=0.0)
        x = x - lr
    if OUTLIERS:
        is_o, j, jm = _tile_slots(slot_ptr, first_ptr, col0, c, hidden, T, KT)
        # the tile's outlier values, re-read from cache, go to their slots (contiguous per row)
        ch = tl.load(chan_ptr + j, mask=jm, other=0)
        rawo = tl.load(x_ptr + r * hidden + ch, mask=row_mask & jm, other=0.0)
        if IN_BF16:  # bf16 inputs travel bit for bit (the reference's .to(bf16) is a no-op)
            obits = rawo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        elif IN_F16:
            xo = rawo.to(tl.float32)
            obits = tl.where(xo != xo, _BF16_NAN_BITS, _bf16_bits(xo))
        else:
            obits = _bf16_bits(rawo)
        _store_bf16_slots(out_ptr, row_off + slots_off + 2 * j, obits, row_mask & jm, EVEN)
        x = tl.where(is_o, 0.0, x)
    codes, stored = _encode_block_tile(x, out_ptr, row_off, row_mask, col0, hidden, data_bytes, R, T, B, SCALE,
                                       BITS, EBITS, MBITS, BIAS, MAX_CODE, EMAX, MAXV, UP_MANT, LEVELS)
    if FEEDBACK:  # the new debt: send minus what the payload decodes to, as the decode kernel forms it
        v = _decode_block_tile(codes, stored, R, T, B, SCALE, BITS, EBITS, MBITS, DEC_MUL, LEVELS)
        if LOWRANK:
            v = v + lr
        tl.store(debt_ptr + r * hidden + c, send - v, mask=m)


@triton.jit
def _block_decode_kernel(p_ptr, out_ptr, slot_ptr, first_ptr, chan_ptr, lr_ptr, src_ptr, rows, hidden, row_bytes,
                         data_bytes, slots_off, src_stride, LOWRANK: tl.constexpr, N: tl.constexpr,
                         EACH: tl.constexpr, ENCODE: tl.constexpr, TABLE: tl.constexpr,
                         OUT_KIND: tl.constexpr,
                         OUTLIERS: tl.constexpr, KT: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr,
                         R: tl.constexpr, T: tl.constexpr, B: tl.constexpr,
                         SCALE: tl.constexpr, BITS: tl.constexpr, EBITS: tl.constexpr,
                         MBITS: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr,
                         EMAX: tl.constexpr, MAXV: tl.constexpr, DEC_MUL: tl.constexpr, UP_MANT: tl.constexpr,
                         LEVELS: tl.constexpr):
    """Sum of N payloads [N, rows, row_bytes] in float32, in index order from +0.0; stored as
    the output dtype, or (ENCODE) requantized into one payload [rows, row_bytes]. EACH (N = 1):
    a plain decode, no accumulation. TABLE: payload i starts `src_ptr[i]` bytes (int64) after
    `p_ptr` instead of `i * src_stride` (separate buffers, e.g. peers' symmetric memory; I64)."""
    SB: tl.constexpr = 2 if SCALE == SCALE_BF16 else 1
    r = tl.program_id(0) * R + tl.arange(0, R)[:, None]
    col0 = tl.program_id(1) * T
    c = col0 + tl.arange(0, T)[None, :]
    row_mask = r < rows
    if I64:
        r = r.to(tl.int64)
    m = row_mask & (c < hidden)
    row_off = r * row_bytes
    if OUTLIERS:
        is_o, j, jm = _tile_slots(slot_ptr, first_ptr, col0, c, hidden, T, KT)
        osum = tl.full([R, KT], 0.0, tl.float32)  # the sum at the tile's outlier channels
    acc = tl.full([R, T], 0.0, tl.float32)
    for i in tl.static_range(N):
        if TABLE:
            off = tl.load(src_ptr + i) + row_off
        else:
            off = (r * 0 + i) * src_stride + row_off  # int64 when I64
        codes = _load_codes(p_ptr, off, row_mask, col0, hidden, R, T, BITS)
        if SCALE == SCALE_E6M2D:
            stored = _load_delta_scales(p_ptr, off, row_mask, col0, hidden, data_bytes, R, T, B, DELTA_GROUP,
                                        DELTA_NAN)
        else:
            stored = _load_scales(p_ptr, off, row_mask, col0, hidden, data_bytes, R, T, B, SB)
        v = _decode_block_tile(tl.reshape(codes, [R, T // B, B]), stored, R, T, B, SCALE, BITS, EBITS, MBITS, DEC_MUL,
                               LEVELS)
        if OUTLIERS:
            ov = _bf16_bits_to_f32(_load_bf16_slots(p_ptr, off + slots_off + 2 * j, row_mask & jm, EVEN))
            osum = ov if EACH else osum + ov
        if EACH:
            acc = v  # a plain decode: -0.0 stays -0.0 (0.0 + -0.0 would not)
        else:
            acc = acc + v
    if LOWRANK:  # every source's low-rank part, summed beforehand
        acc = acc + tl.load(lr_ptr + r * hidden + c, mask=m, other=0.0)
    if ENCODE:
        if OUTLIERS:
            _store_bf16_slots(out_ptr, row_off + slots_off + 2 * j, _bf16_bits(osum), row_mask & jm, EVEN)
            acc = tl.where(is_o, 0.0, acc)
        _encode_block_tile(acc, out_ptr, row_off, row_mask, col0, hidden, data_bytes, R, T, B,
                           SCALE, BITS, EBITS, MBITS, BIAS, MAX_CODE, EMAX, MAXV, UP_MANT, LEVELS)
    else:
        _store_output(out_ptr, r * hidden + c, acc, m, OUT_KIND)
        if OUTLIERS:
            # The outlier channels were stored with their block value (0 or NaN) above; this
            # program overwrites them after a barrier (same addresses, same program: ordered).
            tl.debug_barrier()
            ch = tl.load(chan_ptr + j, mask=jm, other=0)
            _store_output(out_ptr, r * hidden + ch, osum, row_mask & jm, OUT_KIND)


# -- launchers --------------------------------------------------------------------------------
# A launch's grid, scalars and constexprs depend only on shapes, dtypes and the codec's constants,
# so each distinct launch is built once (`Launcher`, launch.py) and reused: per call only the
# tensors change. `run_encode` / `run_decode` hand a launch its tensors in the kernel's order (the
# one place that knows it); the kernel steps (steps.py) and `launch_block_*` go through them.
@lru_cache(maxsize=None)
def _constexprs(element, block, scale) -> dict:
    from tpcomp_megatron.codecs.formats import FORMATS

    fmt = FORMATS[element]
    # e8m0up: MAXV's float32 mantissa bits (the rounding-up test); -1 selects the OCP rule
    up = struct.unpack("<I", struct.pack("<f", fmt.max_value))[0] & 0x7FFFFF if scale == "e8m0up" else -1
    kind = {"bf16": SCALE_BF16, "e6m2": SCALE_E6M2, "e6m2d": SCALE_E6M2D}.get(scale, SCALE_E8M0).value
    return {"B": block, "SCALE": kind, "UP_MANT": up, **format_constexprs(fmt)}


def _choose(rows: int, hidden: int, block: int, scale: str, on_gpu: bool, outliers: bool) -> Tiles:
    """The block codecs' tiles, whole e6m2d groups wide; the hybrid's are twice as tall (its
    per-column slot table is read once per tile: H100 sweep, kernels_tune_h100_2026-11-23-run3.jsonl,
    hybrid encode 0.74 vs 0.66 of copy at 64 MB with 4 x 1024 on 4 warps against 2 x 1024 on 2)."""
    unit = DELTA_GROUP.value if scale == "e6m2d" else block  # e6m2d blocks are smaller than a group
    return choose_tiles(rows, hidden, unit, on_gpu, elems=2 * GPU_TILE_ELEMS if outliers else GPU_TILE_ELEMS)


def check_lowrank(lowrank: torch.Tensor | None, rows: int, hidden: int) -> None:
    """A low-rank part handed to the kernels: a contiguous float32 [rows, hidden] tensor, or None."""
    if lowrank is not None and (lowrank.dtype != torch.float32 or tuple(lowrank.shape) != (rows, hidden)
                                or not lowrank.is_contiguous()):
        raise ValueError(f"low-rank part: a contiguous float32 [{rows}, {hidden}] tensor; "
                         f"got {lowrank.dtype} {tuple(lowrank.shape)}")


def _grid(rows: int, hidden: int, tiles) -> tuple[int, int]:
    return (triton.cdiv(rows, tiles.rows), triton.cdiv(hidden, tiles.cols))


@lru_cache(maxsize=4096)
def encode_launcher(rows: int, hidden: int, row_bytes: int, in_dtype: torch.dtype, device: torch.device, *, element: str,
                    block: int, scale: str, data_bytes: int, window_max: tuple | None, slots_off: int,
                    lowrank: bool, feedback: bool, even: bool, tiles: Tiles | None = None) -> Launcher:
    """The launch of `_block_encode_kernel` for x [rows, hidden] of `in_dtype` -> [rows, row_bytes]
    (`window_max`: the hybrid's outlier windows, None for a block codec; `even`: the payload's
    address is even). Tensors, in order: x, out, slot, first, chan, lowrank, debt (dummies: out)."""
    on_gpu = device.type == "cuda"
    tiles = tiles or _choose(rows, hidden, block, scale, on_gpu, window_max is not None)
    kt = 2 if window_max is None else tile_slots(window_max, tiles.cols)
    return Launcher(_block_encode_kernel, _grid(rows, hidden, tiles), (rows, hidden, row_bytes, data_bytes, slots_off),
                    dict(LOWRANK=lowrank, FEEDBACK=feedback, IN_BF16=in_dtype == torch.bfloat16,
                         IN_F16=in_dtype == torch.float16, OUTLIERS=window_max is not None, KT=kt,
                         EVEN=even and row_bytes % 2 == 0 and slots_off % 2 == 0,
                         I64=needs_int64(rows * hidden, rows * row_bytes), R=tiles.rows, T=tiles.cols,
                         **_constexprs(element, block, scale)),
                    dict(num_warps=tiles.num_warps, **LAUNCH_OPTIONS), rows=rows, row_tile=tiles.rows,
                    row_scalars=((0, 1),))


@lru_cache(maxsize=4096)
def decode_launcher(n: int, rows: int, hidden: int, row_bytes: int, out_dtype: torch.dtype, device: torch.device, *,
                    element: str, block: int, scale: str, data_bytes: int, window_max: tuple | None, slots_off: int,
                    encode: bool, each: bool, lowrank: bool, even: bool, table: bool = False,
                    tiles: Tiles | None = None) -> Launcher:
    """The launch of `_block_decode_kernel` for payloads [n, rows, row_bytes] -> [rows, hidden] of
    `out_dtype` (or, `encode`, the requantized payload; `each`: n = 1 over all rows). Tensors, in
    order: payloads, out (bf16 as int16), slot, first, chan, lowrank, source table (dummies:
    payloads). `table`: the payloads are n separate buffers, the first tensor the lowest of them
    and the table their int64 byte offsets from it."""
    on_gpu = device.type == "cuda"
    tiles = tiles or _choose(rows, hidden, block, scale, on_gpu, window_max is not None)
    kt = 2 if window_max is None else tile_slots(window_max, tiles.cols)
    out_numel = rows * (row_bytes if encode else hidden)
    kind = 0 if encode else out_kind_of(out_dtype, on_gpu)
    return Launcher(_block_decode_kernel, _grid(rows, hidden, tiles),
                    (rows, hidden, row_bytes, data_bytes, slots_off, rows * row_bytes),
                    dict(LOWRANK=lowrank, N=n, EACH=each, ENCODE=encode, TABLE=table, OUT_KIND=kind,
                         OUTLIERS=window_max is not None, KT=kt,
                         EVEN=even and row_bytes % 2 == 0 and slots_off % 2 == 0,
                         I64=table or needs_int64(n * rows * row_bytes, out_numel), R=tiles.rows, T=tiles.cols,
                         **_constexprs(element, block, scale)),
                    dict(num_warps=tiles.num_warps, **LAUNCH_OPTIONS), rows=rows, row_tile=tiles.rows,
                    row_scalars=((0, 1), (5, row_bytes)))


def run_encode(launch: Launcher, rows: int, x: torch.Tensor, out: torch.Tensor, tables: tuple | None = None,
               lowrank: torch.Tensor | None = None, debt: torch.Tensor | None = None) -> None:
    """Launch an `encode_launcher` for `rows` rows: x -> out, with the hybrid's `tables` (slot,
    first, chan), the low-rank part, the error-feedback debt, each only where the launch was
    built for it (absent ones: `out` as a dummy, never read)."""
    slot, first, chan = (out, out, out) if tables is None else tables
    launch.run(rows, x, out, slot, first, chan, out if lowrank is None else lowrank, out if debt is None else debt)


def run_decode(launch: Launcher, rows: int, payloads: torch.Tensor, out: torch.Tensor, tables: tuple | None = None,
               lowrank: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> None:
    """Launch a `decode_launcher` for `rows` rows (n * rows for 'each'): payloads -> out (bf16
    stored as its bits), with the hybrid's `tables`, the low-rank part, the source table
    (`offsets`), each only where the launch was built for it (absent ones: `payloads`)."""
    dst = out.view(torch.int16) if out.dtype == torch.bfloat16 else out  # bf16 stored as bits
    slot, first, chan = (payloads, payloads, payloads) if tables is None else tables
    launch.run(rows, payloads, dst, slot, first, chan, payloads if lowrank is None else lowrank,
               payloads if offsets is None else offsets)


def launch_block_encode(x: torch.Tensor, out: torch.Tensor, *, element: str, block: int, scale: str,
                        data_bytes: int, outliers, slots_off: int, lowrank=None, debt: torch.Tensor | None = None,
                        tiles: Tiles | None = None) -> None:
    """One launch, set up for this call's exact rows, with `tiles` overriding the tile policy
    (tools/bench_kernels.py --tune; the codec operations run plans, `plans.py`). x [rows, hidden]
    (contiguous) -> out [rows, row_bytes] uint8. `outliers`: the hybrid's tables (slot, first,
    chan, window_max), None for a block codec. `lowrank`: the low-rank part L, float32 [rows,
    hidden]: code x - L. `debt` float32 [rows, hidden] (error feedback, not with outliers): code
    x + debt, and overwrite debt with x + debt minus what the payload decodes to."""
    rows, hidden = x.shape
    if debt is not None and (outliers is not None or debt.dtype != torch.float32 or debt.shape != x.shape
                             or not debt.is_contiguous()):
        raise ValueError("error-feedback encode: a contiguous float32 debt of the input's shape, and no outliers")
    if rows == 0:
        return
    check_lowrank(lowrank, rows, hidden)
    window_max = None if outliers is None else tuple(outliers[3])
    launch = encode_launcher(rows, hidden, out.shape[1], x.dtype, x.device, element=element, block=block,
                             scale=scale, data_bytes=data_bytes, window_max=window_max, slots_off=slots_off,
                             lowrank=lowrank is not None, feedback=debt is not None, even=out.data_ptr() % 2 == 0,
                             tiles=tiles)
    run_encode(launch, rows, x, out, None if outliers is None else tuple(outliers[:3]), lowrank, debt)


def launch_block_decode(payloads: torch.Tensor, out: torch.Tensor, *, hidden: int, element: str,
                        block: int, scale: str, data_bytes: int, outliers,
                        slots_off: int, encode: bool, each: bool = False, lowrank: torch.Tensor | None = None,
                        tiles: Tiles | None = None) -> None:
    """One launch, as `launch_block_encode`: payloads [n, rows, row_bytes] -> out [rows, hidden]
    (float dtypes) or, with `encode`, the requantized sum [rows, row_bytes] uint8 (`each`: n = 1).
    `lowrank`: the payloads' low-rank part, all sources together, float32 [rows, hidden]
    (`encode` not supported)."""
    n, rows, row_bytes = payloads.shape
    if lowrank is not None and encode:
        raise ValueError("low-rank decode: no requantization in the kernel")
    check_lowrank(lowrank, rows, hidden)
    if rows == 0:
        return
    window_max = None if outliers is None else tuple(outliers[3])
    even = payloads.data_ptr() % 2 == 0 and (not encode or out.data_ptr() % 2 == 0)
    launch = decode_launcher(n, rows, hidden, row_bytes, out.dtype, payloads.device, element=element, block=block,
                             scale=scale, data_bytes=data_bytes, window_max=window_max, slots_off=slots_off,
                             encode=encode, each=each, lowrank=lowrank is not None, even=even, tiles=tiles)
    run_decode(launch, rows, payloads, out, None if outliers is None else tuple(outliers[:3]), lowrank)
