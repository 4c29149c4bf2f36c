"""Reference codecs: payload bytes against an independent float64 model, error bounds, NaN policy."""

import numpy as np
import pytest
import torch

from tpcomp_megatron.calibration import OutlierParams, select_outlier_channels
from tpcomp_megatron.codecs import FORMATS, BlockCodec, BlockSpec, make_codec, parse_codec_spec

from reference64 import encode_block_row

ALL_FORMATS = sorted(FORMATS)


def _hard_input(rows, hidden, block, dtype, gen, extreme=True):
    """Random rows with the cases that break codecs: zero, huge, tiny and mixed-scale blocks
    (`extreme`: blocks at 1e+-30, beyond the range of E6M2 scales)."""
    x = torch.randn(rows, hidden, generator=gen) * torch.exp(torch.randn(rows, 1, generator=gen) * 3)
    x[0, :block] = 0.0
    if extreme and hidden >= 3 * block:
        x[0, block:2 * block] *= 1e30
        x[0, 2 * block:3 * block] *= 1e-30
    x[-1, -1] = 100.0  # one outlier in the last block
    return x.to(dtype)


@pytest.mark.parametrize("element", ALL_FORMATS)
@pytest.mark.parametrize("block,scale", [(8, "e8m0"), (32, "bf16"), (16, "bf16"), (128, "e8m0"), (32, "e8m0up"),
                                         (8, "e8m0up"), (16, "e6m2"), (64, "e6m2")])
def test_payload_bytes_match_float64_reference(element, block, scale):
    gen = torch.Generator().manual_seed(hash((element, block, scale)) % 2**31)
    codec = BlockCodec(BlockSpec(element=element, block=block, scale=scale))
    hidden = block * 3
    for dtype in (torch.bfloat16, torch.float32):
        x = _hard_input(3, hidden, block, dtype, gen)
        payload = codec.encode(x)
        assert payload.shape == (3, codec.row_bytes(hidden))
        for r in range(3):
            want = encode_block_row(x[r].float().numpy().astype(np.float64), element, block, scale)
            assert bytes(payload[r].tolist()) == want, f"row {r} {dtype}"


def _half_step(f) -> float:
    """The largest rounding error below the largest code, in scale units: half the top binade's
    step (floats), 0.5 (integers), half the widest gap between levels, or the distance from zero
    to the lowest level (codebooks, which have no zero)."""
    if f.is_codebook:
        lv = list(f.levels)
        return max([lv[0]] + [(b - a) / 2 for a, b in zip(lv, lv[1:])])
    return 0.5 if f.is_int else 2.0 ** (f.emax - f.mbits - 1)


def _abs_bound(codec: BlockCodec, x: torch.Tensor) -> torch.Tensor:
    """Per-element worst-case |decode(encode(x)) - x| from the format, per block.

    Round to nearest costs half a step of the top binade, 2**(emax-m-1) in scale units (0.5 for
    integers); saturation costs at most the gap between the largest code and the block maximum:
    with E8M0 scales the scaled maximum is < 2**(emax+1), so the gap is < 2**(emax+1) - max_value;
    with bf16 scales it is the bf16 rounding of the scale, max_value * 2**-8; with E6M2 scales
    (2 mantissa bits, nearest) the scale is within 1/8 of amax / max_value, so the scaled maximum
    is at most max_value * 8 / 7.
    """
    f, B = codec.fmt, codec.spec.block
    rows, hidden = x.shape
    blocks = x.float().reshape(rows, -1, B)
    amax = blocks.abs().amax(-1, keepdim=True)
    half_step = _half_step(f)
    if codec.spec.scale == "e8m0":
        scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax)) - f.emax), torch.zeros_like(amax))
        sat = 2.0 ** (f.emax + 1) - f.max_value
    elif codec.spec.scale == "e8m0up":  # the scale is at most twice the floor rule's; nothing saturates
        scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax)) - f.emax + 1), torch.zeros_like(amax))
        sat = 0.0
    elif codec.spec.scale == "e6m2":
        scale = amax / f.max_value * (1 + 2**-3)
        sat = f.max_value / 7
    else:
        scale = amax / f.max_value * (1 + 2**-8)
        sat = f.max_value * 2**-8
    # codebooks have no zero: a block below the smallest scale decodes to the lowest level times it
    floor = f.levels[0] * {"e8m0": 2.0**-127, "e8m0up": 2.0**-127, "e6m2": 2.0**-32}.get(codec.spec.scale, 0.0) if f.is_codebook else 0.0
    return (scale * (half_step + sat) * (1 + 1e-6) + floor).expand_as(blocks).reshape(rows, hidden)


@pytest.mark.parametrize("element", ALL_FORMATS)
@pytest.mark.parametrize("scale", ["e8m0", "e8m0up", "e6m2", "bf16"])
def test_round_trip_error_within_analytic_bound(element, scale):
    gen = torch.Generator().manual_seed(7)
    for block, hidden, rows in [(8, 40, 5), (32, 96, 3), (64, 576, 7), (128, 640, 1)]:
        codec = BlockCodec(BlockSpec(element=element, block=block, scale=scale))
        x = _hard_input(rows, hidden, block, torch.float32, gen, extreme=scale != "e6m2")
        y = codec.decode_f32(codec.encode(x), hidden)
        err = (y - x).abs()
        bound = _abs_bound(codec, x)
        assert torch.all(err <= bound), f"block {block}: worst excess {(err - bound).max()}"
        if codec.fmt.is_codebook:  # no zero level: the lowest one times the smallest scale
            assert torch.all(y[0, :block].abs() <= codec.fmt.levels[0] * 2.0**-32)
        else:
            assert torch.all(y[0, :block] == 0)  # an all-zero block stays exactly zero


def test_nan_and_inf_poison_only_their_block():
    codec = make_codec("fp4_e2m1/b32/e8m0")
    x = torch.randn(4, 128)
    x[1, 5] = float("nan")
    x[2, 70] = float("inf")
    x[3, 127] = -float("inf")
    y = codec.decode_f32(codec.encode(x), 128)
    nan = torch.isnan(y)
    expect = torch.zeros_like(nan)
    expect[1, 0:32] = expect[2, 64:96] = expect[3, 96:128] = True
    assert torch.equal(nan, expect)
    clean = codec.decode_f32(codec.encode(torch.where(expect, 0.0, x)), 128)
    assert torch.equal(y[~expect], clean[~expect])  # the other blocks' scales are untouched


def test_bits_per_value_and_row_bytes():
    assert make_codec("fp4_e2m1/b32/e8m0").bits_per_value(4096) == 4.25
    assert make_codec("int4/b16/bf16").bits_per_value(4096) == 5.0
    for spec in ["fp5_e2m2/b8/bf16", "fp6_e3m2/b64", "fp8_e4m3/b128/bf16"]:
        c = make_codec(spec)
        assert c.row_bytes(1024) * 8 == c.bits_per_value(1024) * 1024


@pytest.mark.parametrize("text,canonical", [
    ("fp4_e2m1", "fp4_e2m1/b32/e8m0"), ("INT4/bf16/b16", "int4/b16/bf16"),
    ("outlier_int4", "outlier_int4/k64"), ("outlier+fp4_e2m1/b32", "outlier+fp4_e2m1/b32/e8m0/k64"),
])
def test_spec_round_trip(text, canonical):
    spec = parse_codec_spec(text)
    assert str(spec) == canonical and parse_codec_spec(str(spec)) == spec


@pytest.mark.parametrize("bad,needle", [
    ("fp3_e1m1", "unknown codec"), ("fp4_e2m1/b24", "block size 24"), ("int4/fp16", "bad or repeated"),
    ("outlier_int4/b32", "static per-channel"), ("fp4_e2m1/k64", "outlier+"), ("fp4_e2m1/b32/b32", "repeated"),
    ("", "empty"),
])
def test_bad_specs_name_the_valid_choices(bad, needle):
    with pytest.raises(ValueError, match=needle) as e:
        parse_codec_spec(bad)
    assert "valid" in str(e.value)


def test_unsupported_shapes_and_dtypes_raise():
    codec = make_codec("fp4_e2m1/b32")
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        codec.encode(torch.randn(2, 48))
    with pytest.raises(ValueError, match="dtype"):
        codec.encode(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="calibration"):
        make_codec("outlier_int4/k64")


def _planted(rows=400, hidden=128, world=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    parts = torch.randn(world, rows, hidden, generator=gen)
    planted = torch.tensor([3, hidden - 51, hidden - 28])
    parts[:, :, planted] *= torch.tensor([40.0, 25.0, 60.0])
    full = parts.sum(0, keepdim=True)
    src = torch.cat([parts, full])
    return src, planted


def test_outlier_selection_matches_brute_force():
    src, planted = _planted()
    lo, hi = src.amin(1), src.amax(1)
    for rule in ("range_sum", "absmax_max"):
        got = select_outlier_channels(lo, hi, 3, rule)
        assert got.tolist() == planted.tolist()
    # brute force on the paper's rule: score every channel by its summed range, take the top k
    k = 9
    scores = [sum(float(hi[r, c] - lo[r, c]) for r in range(2)) for c in range(128)]
    brute = sorted(sorted(range(128), key=lambda c: -scores[c])[:k])
    assert select_outlier_channels(lo, hi, k).tolist() == brute


@pytest.mark.parametrize("spec", ["outlier_int4/k32", "outlier+fp4_e2m1/b32", "outlier+int8/b16/bf16/k16"])
def test_outlier_codecs_round_trip(spec):
    src, planted = _planted(hidden=128)
    params = OutlierParams.from_stats(src.amin(1), src.amax(1), select_outlier_channels(src.amin(1), src.amax(1), 4))
    codec = make_codec(spec, params)
    for source in (0, 1, -1):
        x = src[source, :17].to(torch.bfloat16)
        y = codec.decode_f32(codec.encode(x, source=source), 128, source=source)
        ch = params.channels
        assert torch.equal(y[:, ch], x[:, ch].float()), "outlier channels travel exactly in bf16"
        if codec.spec.base is None:  # static 4-bit: half a calibrated step inside the range
            rest = torch.ones(128, dtype=torch.bool)
            rest[ch] = False
            bound = params.step[source] / 2 * (1 + 1e-6) + 1e-6
            assert torch.all((y - x.float()).abs()[:, rest] <= bound[rest])
    assert codec.row_bytes(128) * 8 / 128 == pytest.approx(codec.bits_per_value(128))


def test_static_outlier_nan_row_policy():
    src, _ = _planted(hidden=64)
    params = OutlierParams.from_stats(src.amin(1), src.amax(1), torch.tensor([1, 2]))
    codec = make_codec("outlier_int4/k32", params)
    x = src[0, :3].clone()
    x[1, 40] = float("nan")
    y = codec.decode_f32(codec.encode(x), 64)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_calibration_file_round_trip_and_mismatch(tmp_path):
    from tpcomp_megatron.calibration import Calibration, load_calibration, save_calibration

    src, _ = _planted(hidden=64)
    lo, hi = src.amin(1), src.amax(1)
    cal = Calibration(meta={"model": "tiny", "tp_size": 2, "hidden": 64, "ratio": 32, "rule": "range_sum"},
                      stats={"l0": (lo, hi)}, channels={"l0": select_outlier_channels(lo, hi, 2)})
    path = str(tmp_path / "cal.safetensors")
    save_calibration(path, cal)
    back = load_calibration(path)
    assert torch.equal(back.params("l0").step, cal.params("l0").step)
    back.check_matches(tp_size=2, hidden=64, model="tiny")
    with pytest.raises(ValueError, match="TP=2, the model runs at TP=4"):
        back.check_matches(tp_size=4, hidden=64)
    with pytest.raises(ValueError, match="no entry for layer"):
        back.params("l1")
    with pytest.raises(ValueError, match="not a tpcomp calibration"):
        from safetensors.torch import save_file
        save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
        load_calibration(str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("element", ALL_FORMATS)
def test_e8m0up_never_saturates_the_block_maximum(element):
    """The OCP rule clips block maxima in (max_value, 2**(emax+1)) * 2**s; the rounded-up scale
    keeps every block maximum within half a step, on fresh inputs whose maxima land anywhere."""
    gen = torch.Generator().manual_seed(int.from_bytes(element.encode(), "little") % 2**31)
    x = torch.randn(64, 256, generator=gen) * torch.exp2(torch.randint(-20, 20, (64, 1), generator=gen).float())
    up, ocp = (BlockCodec(BlockSpec(element=element, block=32, scale=s)) for s in ("e8m0up", "e8m0"))
    f = up.fmt
    blocks = x.reshape(64, -1, 32)
    idx = blocks.abs().argmax(-1, keepdim=True)
    top = blocks.gather(-1, idx).abs()
    for codec in (up, ocp):
        y = codec.decode_f32(codec.encode(x), 256).reshape(64, -1, 32).gather(-1, idx).abs()
        rel = ((y - top).abs() / top)
        if codec is up:
            # half a step of the top binade relative to a maximum at least half the largest code
            assert rel.max() <= _half_step(f) / (f.max_value / 2) * (1 + 1e-6)
        elif f.max_value < 2.0 ** (f.emax + 1) - 2.0 ** (f.emax - f.mbits):  # formats the OCP rule clips
            assert rel.max() > 0.05


@pytest.mark.parametrize("element", ["fp4_e2m1", "int4", "fp8_e4m3"])
def test_e6m2_range_saturates_and_flushes(element):
    """E6M2 scales span 2**-32 .. 1.5 * 2**31: a block beyond the top saturates at the largest
    code times the largest scale (finite, sign kept), a block below the bottom decodes to
    zeros, and the scale bytes around 1.0 sit where the layout says."""
    codec = BlockCodec(BlockSpec(element=element, block=16, scale="e6m2"))
    f = codec.fmt
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 16, generator=gen)
    x[0] *= 1e30
    x[1] *= 1e-30
    x[2] = x[2] / x[2].abs().max() * f.max_value  # amax / max_value = 1.0 exactly
    payload = codec.encode(x)
    y = codec.decode_f32(payload, 16)
    top = f.max_value * 1.5 * 2.0**31
    assert torch.equal(y[0].abs(), torch.full((16,), top)) and torch.equal(y[0].sign(), x[0].sign())
    assert torch.equal(y[1], torch.zeros(16))
    scale_bytes = payload[:, codec.data_bytes(16):].flatten().tolist()
    assert scale_bytes == [0xFE, 0, 32 << 2]
    assert torch.equal(y[2].abs().max(), torch.tensor(f.max_value))


@pytest.mark.parametrize("element", ["fp4_e2m1", "lloyd4", "int4", "fp6_e2m3"])
@pytest.mark.parametrize("block", [8, 16, 32, 64])
def test_e6m2d_payload_bytes_match_float64_reference(element, block):
    """e6m2d (E6M2 scales as 4-bit deltas from one byte per 128 values): bytes as the float64
    model writes them, on rows with zero, huge, tiny and NaN blocks (deltas clamped, the NaN mark)."""
    gen = torch.Generator().manual_seed(hash((element, block, "e6m2d")) % 2**31)
    codec = BlockCodec(BlockSpec(element=element, block=block, scale="e6m2d"))
    hidden = 384
    for dtype in (torch.bfloat16, torch.float32):
        x = _hard_input(4, hidden, block, dtype, gen)
        x[1, 200] = float("nan")
        x[2, 128 + block:128 + 2 * block] *= 2.0 ** -5  # 5 binades below the rest of its group: the delta clamps
        payload = codec.encode(x)
        assert payload.shape == (4, codec.row_bytes(hidden))
        assert codec.row_bytes(hidden) * 8 == codec.bits_per_value(hidden) * hidden
        for r in range(4):
            want = encode_block_row(x[r].float().numpy().astype(np.float64), element, block, "e6m2d")
            assert bytes(payload[r].tolist()) == want, f"row {r} {dtype}"


@pytest.mark.parametrize("block", [16, 32])
def test_e6m2d_is_e6m2_within_its_range(block):
    """A block within 3.5 binades of its group's largest decodes exactly as with E6M2 scales; one
    further below takes a larger scale: nothing saturates, its error stays within what the group's
    smallest kept scale allows; a NaN poisons only its block."""
    gen = torch.Generator().manual_seed(block)
    delta, plain = make_codec(f"lloyd4/b{block}/e6m2d"), make_codec(f"lloyd4/b{block}/e6m2")
    spread = torch.exp2(torch.rand(6, 256 // block, generator=gen) * 1.5)  # block maxima within ~3 binades
    x = torch.randn(6, 256, generator=gen) * spread.repeat_interleave(block, 1) * 0.3
    assert torch.equal(delta.decode_f32(delta.encode(x), 256), plain.decode_f32(plain.encode(x), 256))
    x[0, :block] *= 2.0 ** -12
    y, z = delta.decode_f32(delta.encode(x), 256), plain.decode_f32(plain.encode(x), 256)
    assert not torch.equal(y[0, :block], z[0, :block]) and torch.equal(y[:, block:], z[:, block:])
    top = x[0, :128].abs().amax()
    assert (y[0, :block] - x[0, :block]).abs().max() <= top * 2.0 ** -3.5 * 0.5
    x[3, 5] = float("nan")
    y = delta.decode_f32(delta.encode(x), 256)
    assert torch.isnan(y).sum() == block and torch.isnan(y[3, :block]).all()


def test_e6m2d_spec_and_shapes():
    c = make_codec("lloyd4/b32/e6m2d")
    assert c.bits_per_value(640) == 4 + 4 / 32 + 8 / 128 and c.row_bytes(640) == 320 + 5 + 10
    assert "not a multiple of the e6m2d group size 128" in c.ineligible(96)
    with pytest.raises(ValueError, match="must be smaller"):
        parse_codec_spec("fp4_e2m1/b128/e6m2d")
    low = parse_codec_spec("lowrank+lloyd4/b32/e6m2d/r64/cfp4_e2m1")
    assert low.coord_spec.scale == "e6m2" and low.bits_per_value(640) == pytest.approx(4.1875 + 64 * 4.25 / 640)
