"""Bit-exact scalar arithmetic of the codecs, as Triton device functions.

Every helper reproduces one step of the PyTorch reference (`tpcomp_megatron.codecs`) bit for bit,
on the GPU and under TRITON_INTERPRET=1 alike. That rules out a few Triton conveniences:

* fp32 `/` may compile to an approximate division: quotients use `tl.math.div_rn` (IEEE).
* Triton has no rint/round: ties-to-even integers come from adding 1.5 * 2**23 (the float adder
  rounds the fraction away) and reading the integer out of the mantissa bits.
* `.to(tl.bfloat16)` truncates in the interpreter: bf16 bit patterns are rounded by hand (ties to
  even) with the NaN patterns of the CPU reference, so payloads and outputs match anywhere. torch
  2.x on the CPU turns a float32 NaN into bf16 0xFFFF (its vectorized conversion) but a float16
  NaN into 0x7FC0; on CUDA it gives 0x7FFF. The kernels follow the CPU (see `_bf16_bits`).
* unary minus is `0 - x` (+0 for +0): signs are set with the sign bit, so -0.0 survives.
* floor(log2 |v|) and powers of two are built from exponent bits (exact, no log2/exp2).
Kernels are launched with `enable_fp_fusion=False`: a fused multiply-add would skip the rounding
of `x * inv` that the reference performs before rounding to the element grid.
"""

from __future__ import annotations

import triton
import triton.language as tl

_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it leaves round-to-nearest-even(t) in the low mantissa bits
_MAGIC_BITS = tl.constexpr(0x4B400000)  # bit pattern of _MAGIC
_F32_NAN_BITS = tl.constexpr(0x7FC00000)
_BF16_NAN_BITS = tl.constexpr(0x7FC0)  # the block codec's NaN scale, and torch's fp16 NaN -> bf16
_BF16_F32_NAN_BITS = tl.constexpr(0xFFFF)  # torch's (CPU) float32 NaN -> bf16


# Reductions call tl.reduce with Triton's own combiners rather than tl.max / tl.sum, and tensors
# are made with tl.full rather than tl.zeros. tl.max, tl.sum and tl.zeros are @triton.jit
# functions of Triton's library, compiled or interpreted according to TRITON_INTERPRET when
# *triton* was imported, and the tests interpret these kernels in a process that may have
# imported triton compiled (megatron-core does). The interpreter recognizes these combiners and
# reduces with numpy (any other combiner runs element by element in Python, 1000x slower).
# Bit fields and 0/1 flags are disjoint, so their sum is their bitwise or. Same GPU code.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _bits(x):
    return x.to(tl.int32, bitcast=True)


@triton.jit
def _from_bits(b):
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _rne_int(t):
    """round-half-to-even(t) as int32, for |t| < 2**22."""
    return _bits(t + _MAGIC) - _MAGIC_BITS


@triton.jit
def _bf16_bits(x):
    """float32 -> bf16 bit pattern (int32 in 0..0xFFFF): ties to even, NaN -> 0xFFFF (torch CPU)."""
    b = _bits(x)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where(x != x, _BF16_F32_NAN_BITS, r)


@triton.jit
def _bf16_bits_to_f32(b):
    """bf16 bit pattern (int32 0..0xFFFF) -> float32 (exact, NaN payloads kept)."""
    return _from_bits(b << 16)


@triton.jit
def _input_to_f32(raw, IN_BF16: tl.constexpr):
    """Loaded input -> float32. bf16 goes through its bits: exact, and the interpreter's own
    bf16 -> fp32 conversion mangles subnormals."""
    if IN_BF16:
        return _bf16_bits_to_f32(raw.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
    return raw.to(tl.float32)


@triton.jit
def _with_sign(val, negative):
    """|val| with the sign bit set where `negative` (so a zero magnitude gives -0.0)."""
    return _from_bits(_bits(val) | (negative.to(tl.int32) << 31))


@triton.jit
def _value_to_code(v, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
                   EMIN: tl.constexpr, EMAXE: tl.constexpr, MAX_CODE: tl.constexpr,
                   FINITE: tl.constexpr, BOUNDED: tl.constexpr, LEVELS: tl.constexpr = ()):
    """Scaled float32 value -> sign-magnitude code (int32), as `ElementFormat.value_to_code`.

    Float formats: e = clamp(floor(log2|v|), EMIN, EMAXE) (EMAXE: exponent of the top binade),
    q = rne(|v| * 2**(m - e)), code = (e - EMIN) * 2**m + q capped at MAX_CODE. NaN -> +0 (the
    reference's nan_to_num), +-Inf -> +-MAX_CODE. Unless BOUNDED, |v| is first capped at
    2**(EMAXE + 1) (integers: MAX_CODE + 1): every larger value saturates anyway, and the cap keeps
    the scaled value small enough for the rounding trick (one min with an absolute operand, where
    capping the scaled value cost an instruction per element more).
    FINITE (E8M0, E6M2 scales: a finite inverse, and the caller discards the codes of non-finite
    blocks): the NaN guard is skipped. BOUNDED (E8M0): |v| < 2**(emax + 1) is known, so is the cap
    (E6M2 needs it: a block past the top of its range saturates).
    Codebook formats (LEVELS, the magnitudes, ascending): the number of midpoints between
    consecutive levels strictly below |v| (exact float32 constants); NaN compares false (code 0).
    """
    a = tl.abs(v)
    if len(LEVELS) > 0:
        mag = tl.full(v.shape, 0, tl.int32)
        for k in tl.static_range(len(LEVELS) - 1):
            mag += (a > (LEVELS[k] + LEVELS[k + 1]) * 0.5).to(tl.int32)
        return mag | ((v < 0).to(tl.int32) << (BITS - 1))
    if not FINITE:
        a = tl.where(v != v, 0.0, a)
    if EBITS == 0:
        if not BOUNDED:
            a = tl.minimum(a, MAX_CODE + 1.0)
        mag = tl.minimum(_rne_int(a), MAX_CODE)
    else:
        if not BOUNDED:
            a = tl.minimum(a, (1 << (EMAXE + 1)) * 1.0)
        e = (_bits(a) >> 23) - 127  # subnormals read as -127: below every EMIN, clamped
        e = tl.minimum(tl.maximum(e, EMIN), EMAXE)
        p2 = _from_bits((MBITS + 127 - e) << 23)  # 2**(m - e), exact
        mag = tl.minimum(((e - EMIN) << MBITS) + _rne_int(a * p2), MAX_CODE)
    return mag | ((v < 0).to(tl.int32) << (BITS - 1))


@triton.jit
def _code_to_value(c, BITS: tl.constexpr, EBITS: tl.constexpr, MBITS: tl.constexpr,
                   DEC_MUL: tl.constexpr, LEVELS: tl.constexpr = ()):
    """Sign-magnitude code (int32) -> signed float32, as `ElementFormat.decode` (exact).

    Float formats: the magnitude bits placed at the top of a float32 mantissa read as
    2**(ef - 127) * 1.mant (ef > 0) or, for ef = 0, as the float32 subnormal mant * 2**(-126 - m);
    one multiply by DEC_MUL = 2**(127 - bias) turns both into the format's value (exact: a power
    of two, and Triton keeps float32 subnormals, no flush-to-zero). The sign bit rides along, so
    -0.0 survives. Integer formats: the magnitude converted, then the sign bit set. Codebook
    formats: the magnitude's level (a chain of selects), then the sign bit set.
    """
    sign = (c >> (BITS - 1)) << 31
    mag = c & ((1 << (BITS - 1)) - 1)
    if len(LEVELS) > 0:
        val = tl.full(c.shape, LEVELS[0], tl.float32)
        for k in tl.static_range(1, len(LEVELS)):
            val = tl.where(mag == k, LEVELS[k], val)
        return _from_bits(_bits(val) | sign)
    if EBITS == 0:
        return _from_bits(_bits(mag.to(tl.float32)) | sign)
    return _from_bits(sign | (mag << (23 - MBITS))) * DEC_MUL


SCALE_E8M0 = tl.constexpr(0)  # the SCALE constexpr of the block kernels: the scale type
SCALE_BF16 = tl.constexpr(1)
SCALE_E6M2 = tl.constexpr(2)
SCALE_E6M2D = tl.constexpr(3)  # E6M2 bytes stored as 4-bit deltas within groups (codecs/block.py)
DELTA_GROUP = tl.constexpr(128)
DELTA_MAX = tl.constexpr(14)
DELTA_NAN = tl.constexpr(15)
_E6M2_NAN = tl.constexpr(0xFF)
_E6M2_MAX = tl.constexpr(0xFE)
_E6M2_BIAS = tl.constexpr(32)


@triton.jit
def _e6m2_to_f32(s):
    """E6M2 scale byte (int32, 0..0xFE) -> float32 2**((s >> 2) - 32) * (1 + (s & 3) / 4), a
    normal float32 built from its bits (exact)."""
    return _from_bits((((s >> 2) + (127 - _E6M2_BIAS)) << 23) | ((s & 3) << 21))


@triton.jit
def _e6m2_inverse(s):
    """E6M2 byte (int32, 0..0xFE) -> 1 / scale = fp32(1 / (1 + m / 4)) * 2**-exponent exactly
    (both normal): no division."""
    m = s & 3
    rcp = tl.where(m == 0, 0x3F800000, tl.where(m == 1, 0x3F4CCCCD, tl.where(m == 2, 0x3F2AAAAB, 0x3F124925)))
    return _from_bits(rcp - (((s >> 2) - _E6M2_BIAS) << 23))


@triton.jit
def _delta_scales(stored, bad, R: tl.constexpr, NB: tl.constexpr, PER: tl.constexpr):
    """e6m2d: the tile's E6M2 bytes [R, NB] (0xFF for non-finite blocks) -> (group bytes
    [R, NB // PER], deltas [R, NB] (15 for non-finite blocks), the bytes the scales decode from
    [R, NB] (0xFF for non-finite blocks), inverse scales [R, NB]). PER blocks per group."""
    s = tl.where(bad, 0, stored)
    group = tl.reduce(tl.reshape(s, [R, NB // PER, PER]), 2, _MAX)
    spread = tl.reshape(tl.broadcast_to(group[:, :, None], [R, NB // PER, PER]), [R, NB])
    delta = tl.minimum(spread - s, DELTA_MAX)
    eff = spread - delta
    return group, tl.where(bad, DELTA_NAN, delta), tl.where(bad, _E6M2_NAN, eff), _e6m2_inverse(eff)


@triton.jit
def _encode_scales(amax, bad, SCALE: tl.constexpr, EMAX: tl.constexpr, MAXV: tl.constexpr,
                   UP_MANT: tl.constexpr):
    """Block maxima (float32, 0 for non-finite blocks) -> (stored scale bits, inverse scale).

    E8M0: s = clamp(floor(log2 amax) - EMAX, -127, 127), stored s + 127, inverse 2**-s; a
    subnormal amax is first scaled by 2**64 (exact) so that its exponent and mantissa bits read
    right; a zero amax clamps to -127, as in the reference.
    E8M0-up (UP_MANT >= 0, the mantissa bits of MAXV): s + 1 where amax > MAXV * 2**s, i.e.
    where amax's mantissa exceeds MAXV's (both are m * 2**floor(log2 amax) there). (With
    EMAX = 0, as for the codebook formats, a subnormal amax in [2**-127, 2**-126) rounds up to
    s = -126: reading its exponent field as -127 without the normalization mis-rounds the others.)
    E6M2: q = amax * fp32(1 / MAXV), its mantissa rounded to 2 bits (ties to even, a carry
    bumps the exponent), biased exponent < 0 -> byte 0, else clamped to 0xFE; inverse = the
    IEEE 1 / scale, read from a 4-entry table of 1 / (1 + m / 4) shifted by the exponent (no
    division; on H100 the divisions turned out not to be what slowed E6M2 down, the NaN guard
    of `_value_to_code` was).
    bf16: scale = bf16(amax / MAXV) (IEEE quotient, ties to even), inverse = IEEE 1 / scale.
    Non-finite blocks store the NaN scale (0xFF / 0x7FC0).
    """
    if SCALE == SCALE_BF16:
        sbits = _bf16_bits(tl.math.div_rn(amax, tl.full(amax.shape, MAXV, tl.float32)))
        scale = _bf16_bits_to_f32(sbits)
        inv = tl.where(scale > 0, tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), scale), 0.0)
        stored = tl.where(bad, _BF16_NAN_BITS, sbits)
    elif SCALE == SCALE_E6M2:
        b = _bits(amax * tl.full(amax.shape, 1.0 / MAXV, tl.float32))
        near = (b + 0xFFFFF + ((b >> 21) & 1)) & 0x7FE00000
        # near >> 21 is (float32 exponent << 2) | 2 mantissa bits: rebiasing the exponent gives
        # the E6M2 byte, negative below its range
        s = tl.minimum(tl.maximum((near >> 21) - ((127 - _E6M2_BIAS) << 2), 0), _E6M2_MAX)
        inv = _e6m2_inverse(s)
        stored = tl.where(bad, _E6M2_NAN, s)
    else:
        tiny = amax < 1.1754943508222875e-38  # subnormal (or zero): normalized exactly by 2**64
        ab = _bits(tl.where(tiny, amax * 18446744073709551616.0, amax))
        s = (ab >> 23) - 127 - EMAX - tl.where(tiny, 64, 0)
        if UP_MANT >= 0:
            s += ((ab & 0x7FFFFF) > UP_MANT).to(tl.int32)
        s = tl.minimum(tl.maximum(s, -127), 127)
        inv = _from_bits(tl.where(s == 127, 0x00400000, (127 - s) << 23))  # 2**-127 is subnormal
        stored = tl.where(bad, 0xFF, s + 127)
    return stored, inv


@triton.jit
def _decode_scales(stored, SCALE: tl.constexpr):
    """Stored scale bits (int32: a byte, or two bytes as one 16-bit pattern) -> float32 scale."""
    if SCALE == SCALE_BF16:
        return _bf16_bits_to_f32(stored)
    if SCALE == SCALE_E6M2 or SCALE == SCALE_E6M2D:  # e6m2d: the bytes its deltas give
        return tl.where(stored == _E6M2_NAN, _from_bits(tl.full(stored.shape, _F32_NAN_BITS, tl.int32)),
                        _e6m2_to_f32(stored))
    bits = tl.where(stored == 0, 0x00400000, stored << 23)  # 2**-127 is subnormal
    return _from_bits(tl.where(stored == 0xFF, _F32_NAN_BITS, bits))


@triton.jit
def _store_output(ptr, offs, val, mask, OUT_KIND: tl.constexpr):
    """Store float32 `val` as the output dtype: 0 float32; 1 bf16 rounded by hand (the
    interpreter, whose own conversion truncates); 2 float16 (hardware and numpy round to nearest
    even); 3 bf16 by the hardware conversion (GPU: also ties to even, one instruction per pair,
    only NaN's bit pattern differs from the CPU reference). bf16 goes through an int16 view."""
    if OUT_KIND == 0:
        tl.store(ptr + offs, val, mask=mask)
    elif OUT_KIND == 1:
        tl.store(ptr + offs, _bf16_bits(val).to(tl.int16), mask=mask)
    elif OUT_KIND == 2:
        tl.store(ptr + offs, val.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, val.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)
