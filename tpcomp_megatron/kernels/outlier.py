"""Fused kernels of the static outlier codec (`outlier_int4/k<N>`).

Its NaN/Inf rule couples a whole row: a non-finite value anywhere in a row sends NaN in all its
outlier slots, so encode and decode_sum_encode give a program `R` whole rows, walked in column
chunks of `T` (the row flag stays in registers, the input is read once). A NaN slot poisons the
decoded row: decode programs own a column tile and read the row's slots (2k bytes) to know.

Per-source tables (float32 `[sources, hidden]` on the device, see `tables.py`): `lo`, `step`, and
`inv`, the reference's `inv_step` with 0 on outlier channels, which makes their codes 0 exactly as
the reference's explicit zeroing does (`(x - lo) * 0` is +-0 or NaN, both code 0). `slot[c]` is
the outlier slot of channel c or -1; `chan` the channel of each slot.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .launch import CPU_TILE_ELEMS, LAUNCH_OPTIONS, Launcher, Tiles, choose_tiles, needs_int64, out_kind_of
from .numerics import (_F32_NAN_BITS, _bf16_bits, _bf16_bits_to_f32, _bits, _from_bits,
                       _input_to_f32, _SUM, _rne_int, _store_output)
from .tables import tile_slots
from .pack import _load_bf16_slots, _load_codes, _store_bf16_slots, _store_codes

LEVELS = tl.constexpr(15.0)
# The static decode kernels keep the larger tiles they were tuned with (the per-source table
# chunks are re-read per program); whole-row programs have their own policy (`_tiles`).
STATIC_TILE_ELEMS = 8192


@triton.jit
def _static_code(x, lo, inv):
    """The reference's `nan_to_num(round((x - lo) * inv).clamp(0, 15))` (clamp and round commute
    for integer bounds)."""
    d = (x - lo) * inv
    d = tl.where(d != d, 0.0, d)
    return _rne_int(tl.minimum(tl.maximum(d, 0.0), LEVELS))


@triton.jit
def _nonfinite_any(x, mask):
    """[R, T] -> [R, 1] int32: 1 where the row holds a non-finite value under `mask`."""
    return tl.reduce(tl.where(mask & ((_bits(x) & 0x7FFFFFFF) >= 0x7F800000), 1, 0), 1, _SUM, keep_dims=True)


@triton.jit
def _static_encode_kernel(x_ptr, out_ptr, lo_ptr, inv_ptr, chan_ptr, rows, hidden, row_bytes,
                          k, slots_off, table_off,
                          IN_BF16: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr, R: tl.constexpr,
                          T: tl.constexpr, CHUNKS: tl.constexpr, KP: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)[:, None]
    row_mask = r < rows
    if I64:
        r = r.to(tl.int64)
    row_off = r * row_bytes
    bad = tl.full([R, 1], 0, tl.int32)
    for chunk in range(CHUNKS):
        col0 = chunk * T
        c = col0 + tl.arange(0, T)[None, :]
        cm = c < hidden
        m = row_mask & cm
        # x read 4 lanes per access, the float32 tables' width, so both share a layout (8 lanes,
        # natural for bf16, sent every chunk of x through shared memory to meet the tables)
        xo = tl.max_contiguous(r * hidden + c, [1, 4])
        x = _input_to_f32(tl.load(x_ptr + xo, mask=m, other=0.0, eviction_policy="evict_first"), IN_BF16)
        lo = tl.load(lo_ptr + table_off + c, mask=cm, other=0.0, eviction_policy="evict_last")
        inv = tl.load(inv_ptr + table_off + c, mask=cm, other=0.0, eviction_policy="evict_last")
        _store_codes(out_ptr, row_off, row_mask, col0, hidden, _static_code(x, lo, inv), R, T, 4, True)
        bad = bad | _nonfinite_any(x, m)
    # Outlier slots last, once the row's flag is known; the values come back from cache.
    j = tl.arange(0, KP)[None, :]
    jm = j < k
    ch = tl.load(chan_ptr + j, mask=jm, other=0)
    xo = _input_to_f32(tl.load(x_ptr + r * hidden + ch, mask=row_mask & jm, other=0.0), IN_BF16)
    xo = tl.where(bad > 0, _from_bits(tl.full([R, KP], _F32_NAN_BITS, tl.int32)), xo)
    _store_bf16_slots(out_ptr, row_off + slots_off + 2 * j, _bf16_bits(xo), row_mask & jm, EVEN)


@triton.jit
def _static_decode_kernel(p_ptr, out_ptr, lo_ptr, step_ptr, lo_out_ptr, inv_ptr, slot_ptr, chan_ptr, first_ptr,
                          rows, hidden, row_bytes, k, slots_off, pay_stride, src_off0, src_step, out_table_off,
                          N: tl.constexpr, EACH: tl.constexpr, ENCODE: tl.constexpr,
                          OUT_KIND: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr, R: tl.constexpr,
                          T: tl.constexpr, CHUNKS: tl.constexpr, KP: tl.constexpr, KT: tl.constexpr):
    """decode_sum (N payloads), decode_each (EACH: payload = program_id(2), N = 1) or, with
    ENCODE, decode_sum requantized with the row at `out_table_off` of `lo_out` / `inv` (the
    decode tables `lo` / `step` may be rows gathered for this call).

    Grid: (row tiles, column tiles, payloads). Decoding walks CHUNKS = 1 column tile; ENCODE needs
    whole rows (its NaN rule), so it has one column tile of CHUNKS chunks. Every program first reads
    all slots of its rows (the NaN flag, 2k bytes per row from cache) and the slots of its own
    columns (at most KT, or all KP for ENCODE); the column loop decodes every channel from its
    codes, and the outlier channels of the output are then overwritten with the slot values
    (ENCODE: the slots are requantized directly)."""
    r = tl.program_id(0) * R + tl.arange(0, R)[:, None]
    row_mask = r < rows
    if EACH:
        first = tl.program_id(2)
    else:
        first = 0
    if I64:
        r = r.to(tl.int64)
    row_off = r * row_bytes
    zero = r * 0  # payload offsets are formed from it, so they are int64 when I64
    nan = _from_bits(tl.full([R, 1], _F32_NAN_BITS, tl.int32))
    cstart = tl.program_id(1) * (CHUNKS * T)
    ja = tl.arange(0, KP)[None, :]
    jam = ja < k
    if ENCODE:
        j = ja
        jm = jam
        JN: tl.constexpr = KP
    else:
        j0 = tl.load(first_ptr + cstart)
        j1 = tl.load(first_ptr + tl.minimum(cstart + CHUNKS * T, hidden))
        j = j0 + tl.arange(0, KT)[None, :]
        jm = j < j1
        JN: tl.constexpr = KT
    # A NaN in any slot of a row poisons that source's whole row, hence the sum's.
    bad = tl.full([R, 1], 0, tl.int32)
    osum = tl.full([R, JN], 0.0, tl.float32)
    for i in tl.static_range(N):
        base = (zero + first + i) * pay_stride + row_off + slots_off
        oa = _bf16_bits_to_f32(_load_bf16_slots(p_ptr, base + 2 * ja, row_mask & jam, EVEN))
        bad = bad | tl.reduce(tl.where(jam & (oa != oa), 1, 0), 1, _SUM, keep_dims=True)
        if ENCODE:
            ob = oa
        else:
            ob = _bf16_bits_to_f32(_load_bf16_slots(p_ptr, base + 2 * j, row_mask & jm, EVEN))
        osum = ob if EACH else osum + ob  # the value at the outlier channels, summed as `acc`
    bad_out = tl.full([R, 1], 0, tl.int32)
    for chunk in range(CHUNKS):
        col0 = cstart + chunk * T
        c = col0 + tl.arange(0, T)[None, :]
        cm = c < hidden
        m = row_mask & cm
        acc = tl.full([R, T], 0.0, tl.float32)
        for i in tl.static_range(N):
            base = (zero + first + i) * pay_stride + row_off
            toff = src_off0 + (first + i) * src_step
            q = _load_codes(p_ptr, base, row_mask, col0, hidden, R, T, 4, True).to(tl.float32)
            lo = tl.load(lo_ptr + toff + c, mask=cm, other=0.0, eviction_policy="evict_last")
            st = tl.load(step_ptr + toff + c, mask=cm, other=0.0, eviction_policy="evict_last")
            if EACH:
                acc = lo + q * st  # a plain decode: -0.0 stays -0.0
            else:
                acc = acc + (lo + q * st)
        acc = tl.where(bad > 0, nan, acc)
        if ENCODE:
            lo = tl.load(lo_out_ptr + out_table_off + c, mask=cm, other=0.0, eviction_policy="evict_last")
            inv = tl.load(inv_ptr + out_table_off + c, mask=cm, other=0.0, eviction_policy="evict_last")
            # inv is 0 on outlier channels: their codes are 0 whatever `acc` holds there
            _store_codes(out_ptr, row_off, row_mask, col0, hidden, _static_code(acc, lo, inv), R, T, 4, True)
            is_o = tl.load(slot_ptr + tl.max_contiguous(c, [1, 4]), mask=cm, other=-1,
                           eviction_policy="evict_last") >= 0  # 4 lanes, as the float32 tables
            bad_out = bad_out | _nonfinite_any(acc, m & ~is_o)
        else:
            # 4 lanes per access, as the tables (a wider store would convert acc's layout first)
            _store_output(out_ptr, tl.max_contiguous((first * rows + r) * hidden + c, [1, 4]), acc, m, OUT_KIND)
    osum = tl.where(bad > 0, nan, osum)
    if ENCODE:
        bad_out = bad_out | _nonfinite_any(osum, row_mask & jm)
        osum = tl.where(bad_out > 0, nan, osum)
        _store_bf16_slots(out_ptr, row_off + slots_off + 2 * j, _bf16_bits(osum), row_mask & jm, EVEN)
    else:
        # same addresses, same program: the barrier orders these stores after the loop's
        tl.debug_barrier()
        ch = tl.load(chan_ptr + j, mask=jm, other=0)
        _store_output(out_ptr, (first * rows + r) * hidden + ch, osum, row_mask & jm, OUT_KIND)


# -- launchers --------------------------------------------------------------------------------
def _tiles(rows: int, hidden: int, on_gpu: bool, *, encode: bool) -> Tiles:
    """Whole-row programs, walked in column chunks. Encode: one row per program, chunks of up to
    2048 columns on 8 warps. H100 (kernels_tune_h100_2026-11-23-run3.jsonl, run 6 of
    kernels_h100_2026-11-23-series.md): 0.54-0.72 of copy from 8 MB, where the earlier policy gave
    0.46-0.63; its 108-register programs ran at 25% occupancy. decode_sum_encode keeps that earlier
    policy, 1024-column chunks on up to 8 rows, because the encode's tile cost it 0.15-0.20 ->
    0.13-0.14."""
    if encode and on_gpu:
        t = choose_tiles(rows, hidden, 2, on_gpu, max_t=2048, elems=2048)
        return Tiles(1, t.cols, 8 if t.cols >= 2048 else 4)
    t = choose_tiles(rows, hidden, 2, on_gpu, elems=STATIC_TILE_ELEMS)
    if not on_gpu:
        return Tiles(max(1, min(t.rows, CPU_TILE_ELEMS // t.cols)), t.cols, 4)
    r = 1
    while r * 2 <= t.rows and rows // (r * 2) >= 512:
        r *= 2
    return Tiles(r, t.cols, 8 if r * t.cols >= 8192 else 4)


def _kp(k: int) -> int:
    return max(2, 1 << max(0, (k - 1).bit_length()))


@lru_cache(maxsize=4096)
def static_encode_launcher(rows: int, hidden: int, row_bytes: int, k: int, in_dtype: torch.dtype,
                           device: torch.device, src_row: int, even: bool, tiles: Tiles | None = None) -> Launcher:
    """Tensors, in order: x, out, lo, inv, chan."""
    on_gpu = device.type == "cuda"
    t = tiles or _tiles(rows, hidden, on_gpu, encode=True)
    return Launcher(_static_encode_kernel, (triton.cdiv(rows, t.rows),),
                    (rows, hidden, row_bytes, k, hidden // 2, src_row * hidden),
                    dict(IN_BF16=in_dtype == torch.bfloat16, EVEN=even and row_bytes % 2 == 0 and (hidden // 2) % 2 == 0,
                         I64=needs_int64(rows * hidden, rows * row_bytes), R=t.rows, T=t.cols,
                         CHUNKS=triton.cdiv(hidden, t.cols), KP=_kp(k)),
                    dict(num_warps=t.num_warps, **LAUNCH_OPTIONS), rows=rows, row_tile=t.rows, row_scalars=((0, 1),))


@lru_cache(maxsize=4096)
def static_decode_launcher(n: int, rows: int, hidden: int, row_bytes: int, k: int, sources: int,
                           out_dtype: torch.dtype, device: torch.device, window_max: tuple, src_start: int,
                           src_step: int, each: bool, out_row: int, even: bool, tiles: Tiles | None = None) -> Launcher:
    """Tensors, in order: payloads, out (bf16 as int16), lo, step, lo_out, inv, slot, chan, first
    (`sources`: rows of the lo / step tables)."""
    on_gpu = device.type == "cuda"
    encode = out_dtype == torch.uint8
    if encode:  # whole rows per program
        t = tiles or _tiles(rows, hidden, on_gpu, encode=False)
        chunks, grid = triton.cdiv(hidden, t.cols), (triton.cdiv(rows, t.rows), 1, 1)
    else:
        t = tiles or choose_tiles(rows, hidden, 2, on_gpu, elems=STATIC_TILE_ELEMS)
        chunks, grid = 1, (triton.cdiv(rows, t.rows), triton.cdiv(hidden, t.cols), n if each else 1)
    out_numel = rows * row_bytes if encode else (n if each else 1) * rows * hidden
    return Launcher(_static_decode_kernel, grid,
                    (rows, hidden, row_bytes, k, hidden // 2, rows * row_bytes, src_start * hidden,
                     src_step * hidden, out_row * hidden),
                    dict(N=1 if each else n, EACH=each, ENCODE=encode, OUT_KIND=0 if encode else out_kind_of(out_dtype, on_gpu),
                         EVEN=even and row_bytes % 2 == 0 and (hidden // 2) % 2 == 0,
                         I64=needs_int64(n * rows * row_bytes, out_numel, sources * hidden), R=t.rows, T=t.cols,
                         CHUNKS=chunks, KP=_kp(k), KT=1 if encode else tile_slots(window_max, t.cols)),
                    dict(num_warps=t.num_warps, **LAUNCH_OPTIONS), rows=rows, row_tile=t.rows,
                    row_scalars=((0, 1), (5, row_bytes)))


def run_static_encode(launch: Launcher, rows: int, x, out, lo, inv, chan) -> None:
    """Launch a `static_encode_launcher` for `rows` rows: x -> out."""
    launch.run(rows, x, out, lo, inv, chan)


def run_static_decode(launch: Launcher, rows: int, payloads, out, lo, step, lo_out, inv, slot, chan, first) -> None:
    """Launch a `static_decode_launcher` for `rows` rows: payloads -> out (bf16 stored as its bits)."""
    dst = out.view(torch.int16) if out.dtype == torch.bfloat16 else out  # bf16 stored as bits
    launch.run(rows, payloads, dst, lo, step, lo_out, inv, slot, chan, first)


def launch_static_encode(x, out, *, lo, inv, chan, src_row: int, tiles: Tiles | None = None) -> None:
    """One launch, set up for this call's exact rows, with `tiles` overriding the tile policy
    (tools/bench_kernels.py --tune; the codec operations run plans, `plans.py`)."""
    rows, hidden = x.shape
    if rows == 0:
        return
    launch = static_encode_launcher(rows, hidden, out.shape[1], chan.numel(), x.dtype, x.device, src_row,
                                    out.data_ptr() % 2 == 0, tiles)
    run_static_encode(launch, rows, x, out, lo, inv, chan)


def launch_static_decode(payloads, out, *, hidden: int, lo, step, lo_out, inv, slot, chan, first, window_max,
                         src_start: int, src_step: int, each: bool, out_row: int = 0,
                         tiles: Tiles | None = None) -> None:
    """One launch, as `launch_static_encode`. Payload i uses table row `src_start + i * src_step`.
    `out` is [rows, hidden] (sum), [n * rows, hidden] (each) or a payload [rows, row_bytes] when
    `out` is uint8 (the requantized sum, table row `out_row`)."""
    n, rows, row_bytes = payloads.shape
    if rows == 0:
        return
    even = payloads.data_ptr() % 2 == 0 and (out.dtype != torch.uint8 or out.data_ptr() % 2 == 0)
    launch = static_decode_launcher(n, rows, hidden, row_bytes, chan.numel(), lo.shape[0], out.dtype,
                                    payloads.device, tuple(window_max), src_start, src_step, each, out_row, even,
                                    tiles)
    run_static_decode(launch, rows, payloads, out, lo, step, lo_out, inv, slot, chan, first)
