"""An independent float64 / brute-force model of the block codec payload, for tests only.

It shares no code with `tpcomp_megatron.codecs`: element grids are enumerated from the format
definitions, each value goes to the nearest grid point by exhaustive search (ties to the even code),
fp32 steps are emulated with numpy.float32 and bits are packed as Python integers.
"""

from __future__ import annotations

import math

import numpy as np

# name -> (bits, exponent bits, mantissa bits); ebits 0 = symmetric integer
FORMATS64 = {
    "fp4_e2m1": (4, 2, 1), "fp5_e2m2": (5, 2, 2), "fp5_e3m1": (5, 3, 1), "fp6_e2m3": (6, 2, 3),
    "fp6_e3m2": (6, 3, 2), "fp8_e4m3": (8, 4, 3), "int4": (4, 0, 0), "int8": (8, 0, 0),
}


# codebook formats: name -> (bits, magnitude levels x 4096), each value to the nearest level
# (a tie to the lower code)
CODEBOOKS64 = {
    "lloyd3": (3, [299, 1400, 2657, 4096]),
    "lloyd4": (4, [146, 590, 1097, 1636, 2192, 2767, 3412, 4096]),
    "lloyd5": (5, [55, 183, 332, 497, 669, 845, 1025, 1212, 1412, 1633, 1887, 2180, 2538, 2977, 3536, 4096]),
}
FORMATS64.update({name: (bits, 0, 0) for name, (bits, _) in CODEBOOKS64.items()})


def grid(name: str) -> list[float]:
    """Magnitude of every finite code, index = code."""
    if name in CODEBOOKS64:
        return [v / 4096 for v in CODEBOOKS64[name][1]]
    bits, e, m = FORMATS64[name]
    if e == 0:
        return [float(i) for i in range(2 ** (bits - 1))]
    bias = 2 ** (e - 1) - 1
    vals = []
    for code in range(2 ** (bits - 1)):
        ef, mant = code >> m, code & (2**m - 1)
        if ef == 0:
            vals.append(mant / 2**m * 2.0 ** (1 - bias))
        else:
            vals.append((1 + mant / 2**m) * 2.0 ** (ef - bias))
    if name == "fp8_e4m3":
        vals = vals[:-1]  # 0x7F is NaN
    return vals


def bf16_rne(x: float) -> float:
    """Round a float32 value to bfloat16, nearest-even, via its bit pattern."""
    b = int(np.float32(x).view(np.uint32))
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return float(np.uint32(b).view(np.float32))


def e6m2_nearest(q: float) -> tuple[int, float]:
    """q >= 0 -> (byte, scale) of the E6M2 scale nearest to q (mantissa 1.m1m0, ties to even
    mantissa, exponent in [-32, 31], byte = (exponent + 32) * 4 + mantissa, at most 0xFE)."""
    if q == 0:
        return 0, 2.0 ** -32
    f, e = math.frexp(q)  # q = f * 2**e, f in [0.5, 1)
    quarters = round(f * 8)  # 1.m as quarters, 4..8; Python rounds exact halves to even
    exp = e - 1
    if quarters == 8:
        quarters, exp = 4, exp + 1
    if exp < -32:
        byte = 0
    else:
        byte = min((exp + 32) * 4 + quarters - 4, 0xFE)
    return byte, (1 + (byte & 3) / 4) * 2.0 ** ((byte >> 2) - 32)


def nearest_code(v: float, g: list[float], codebook: bool = False) -> int:
    a = abs(v)
    if a >= g[-1]:
        return len(g) - 1
    # tie: the even code (float formats, integers), the lower code (codebooks)
    return min(range(len(g)), key=lambda i: (abs(g[i] - a), i if codebook else i % 2))


def e6m2_value(byte: int) -> float:
    return (1 + (byte & 3) / 4) * 2.0 ** ((byte >> 2) - 32)


def _delta_scales(row: list[float], block: int, top: float, group: int = 128) -> tuple[list[float], bytes]:
    """e6m2d: each finite block's E6M2 byte, written as a delta (at most 14) below the largest
    byte of its group of `group` values -> (each block's scale, NaN for a non-finite block; the
    group bytes followed by the deltas, two per byte, even block low)."""
    blocks = [row[b0:b0 + block] for b0 in range(0, len(row), block)]
    finite = [all(math.isfinite(v) for v in blk) for blk in blocks]
    own = [e6m2_nearest(float(np.float32(max(abs(v) for v in blk)) * np.float32(1.0 / top)))[0] if ok else 0
           for blk, ok in zip(blocks, finite)]
    per = group // block
    heads = [max(own[i:i + per]) for i in range(0, len(own), per)]
    deltas = [min(heads[i // per] - b, 14) if ok else 15 for i, (b, ok) in enumerate(zip(own, finite))]
    scales = [e6m2_value(heads[i // per] - d) if d != 15 else math.nan for i, d in enumerate(deltas)]
    return scales, bytes(heads) + bytes(lo | hi << 4 for lo, hi in zip(deltas[0::2], deltas[1::2]))


def encode_block_row(row: np.ndarray, name: str, block: int, scale: str) -> bytes:
    bits, e, m = FORMATS64[name]
    g = grid(name)
    emax = math.floor(math.log2(g[-1]))
    codes, scales = [], []
    if scale == "e6m2d":
        delta_scales, tail = _delta_scales([float(v) for v in row], block, g[-1])
    for b0 in range(0, len(row), block):
        blk = [float(v) for v in row[b0:b0 + block]]
        if not all(math.isfinite(v) for v in blk):
            codes += [0] * block
            scales.append((0x7FC0).to_bytes(2, "little") if scale == "bf16" else b"\xff")
            continue
        amax = max(abs(v) for v in blk)
        if scale.startswith("e8m0"):
            s = math.frexp(amax)[1] - 1 - emax
            if scale == "e8m0up" and amax > g[-1] * 2.0 ** s:  # round up: the maximum never saturates
                s += 1
            s = -127 if amax == 0 else max(-127, min(127, s))
            scales.append(bytes([s + 127]))
            scaled = [v * 2.0 ** (-s) for v in blk]
        elif scale in ("e6m2", "e6m2d"):
            s, sc = e6m2_nearest(float(np.float32(amax) * np.float32(1.0 / g[-1])))
            if scale == "e6m2d":
                sc = delta_scales[b0 // block]
            scales.append(bytes([s]))
            inv = np.float32(1.0) / np.float32(sc)
            scaled = [float(np.float32(v) * inv) for v in blk]
        else:
            sc = bf16_rne(float(np.float32(amax) / np.float32(g[-1])))
            scales.append((int(np.float32(sc).view(np.uint32)) >> 16).to_bytes(2, "little"))
            inv = np.float32(1.0) / np.float32(sc) if sc > 0 else np.float32(0.0)
            scaled = [float(np.float32(v) * inv) for v in blk]
        for v in scaled:
            c = nearest_code(v, g, codebook=name in CODEBOOKS64)
            codes.append(c | ((1 << (bits - 1)) if v < 0 else 0))
    return _pack(codes, bits) + (tail if scale == "e6m2d" else b"".join(scales))


def _fields(values, width):
    """Fields of `width` bits, field i at bit i * width of a little-endian bit string."""
    return sum(v << (i * width) for i, v in enumerate(values)).to_bytes(len(values) * width // 8, "little")


def _pack(codes, bits):
    """8 and 4 bits: one bit string; 5 and 6: the low-nibble plane, then the top-bits plane;
    3: the plane of the low 2 bits, then the top-bit plane."""
    if bits in (4, 8):
        return _fields(codes, bits)
    low = 2 if bits == 3 else 4
    return _fields([c & ((1 << low) - 1) for c in codes], low) + _fields([c >> low for c in codes], bits - low)
