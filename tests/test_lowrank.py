"""The low-rank + block codec (`lowrank+<block spec>/r<K>`) and its calibrated bases.

Independent references: the float64 block codec (reference64) applied to a float64 projection;
a brute-force SVD of all rows for the streamed sketch; planted directions."""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_cases import lowrank_bases, lowrank_input
from reference64 import encode_block_row

from tpcomp_megatron.calibration import (SKETCH_ROWS, Calibration, load_calibration, save_calibration, sketch_basis,
                                         sketch_rows)
from tpcomp_megatron.codecs import REDUCED, LowRankSpec, make_codec, parse_codec_spec
from tpcomp_megatron.quality.calib import build_calibration, layer_codecs


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def test_spec_grammar_and_bits():
    s = parse_codec_spec("lowrank+fp4_e2m1/b32/e6m2/r8")
    assert s == LowRankSpec(base=parse_codec_spec("fp4_e2m1/b32/e6m2"), rank=8)
    assert str(s) == "lowrank+fp4_e2m1/b32/e6m2/r8" and parse_codec_spec(str(s)) == s
    assert parse_codec_spec("lowrank+int4/bf16").rank == 4  # default rank
    assert s.bits_per_value(640) == pytest.approx(4.25 + 16 * 8 / 640)
    c = parse_codec_spec("lowrank+lloyd4/r64/b32/clloyd3/e6m2")  # coded coordinates, parts in any order
    assert c == LowRankSpec(base=parse_codec_spec("lloyd4/b32/e6m2"), rank=64, coords="lloyd3")
    assert str(c) == "lowrank+lloyd4/b32/e6m2/r64/clloyd3" and parse_codec_spec(str(c)) == c
    assert c.bits_per_value(640) == pytest.approx(4.25 + 64 * 3.25 / 640)
    for bad, why in [("fp4_e2m1/r4", "needs the 'lowrank\\+' prefix"), ("lowrank+fp4_e2m1/r0", "rank must be"),
                     ("lowrank+fp4_e2m1/r129", "rank must be"), ("lowrank+fp4_e2m1/k8", "outlier\\+"),
                     ("lowrank+outlier_int4", "unknown codec"), ("fp4_e2m1/cfp4_e2m1", "needs the 'lowrank\\+' prefix"),
                     ("lowrank+fp4_e2m1/b32/r48/cfp4_e2m1", "multiple of the block size 32"),
                     ("lowrank+fp4_e2m1/r32/cfp9", "unknown coordinate format")]:
        with pytest.raises(ValueError, match=why):
            parse_codec_spec(bad)


@pytest.mark.parametrize("spec,hidden", [("lowrank+fp4_e2m1/b32/e6m2/r4", 640), ("lowrank+int4/b16/bf16/r1", 96),
                                         ("lowrank+fp8_e4m3/b8/e8m0/r8", 200),
                                         ("lowrank+lloyd4/b32/e6m2/r64/clloyd4", 640),
                                         ("lowrank+fp4_e2m1/b8/e8m0/r24/cfp8_e4m3", 200)])
def test_payload_equals_float64_composition(spec, hidden):
    """Row payload = the float64 block codec's bytes of x - c @ B, then the coordinates: bf16(x @
    B^T), or with coded coordinates the float64 block codec's bytes of those, c being what they
    decode to; for every source's basis. A sum of payloads decodes to the sum of their decodes."""
    gen = _gen(spec, hidden)
    parsed = parse_codec_spec(spec)
    bases = lowrank_bases(hidden, 2, parsed.rank, gen)
    codec = make_codec(parsed, bases)
    n = codec.data_bytes(hidden)
    for src in (0, 1, REDUCED):
        x = lowrank_input(9, bases, src, torch.float32, gen, nonfinite=False)
        b = codec.bases[src].double()  # the codec rounds its bases to bf16 once
        coef = (x.double() @ b.T).to(torch.bfloat16)
        payload = codec.encode(x, source=src)
        # float32 (codec) against float64 (here) arithmetic may flip a value at a rounding tie
        if parsed.coords is None:
            assert (payload[:, n:].contiguous().view(torch.bfloat16) != coef).float().mean() <= 0.02, src
        else:
            cs = parsed.coord_spec
            tail = torch.tensor([list(encode_block_row(r, cs.element, cs.block, cs.scale))
                                 for r in coef.double().numpy()], dtype=torch.uint8)
            assert (payload[:, n:] != tail).float().mean() <= 0.02, src
            coef = codec.coords.decode_f32(tail, parsed.rank)
        resid = (x.double() - coef.double() @ b).float().numpy()
        want = torch.tensor([list(encode_block_row(r, parsed.base.element, parsed.base.block, parsed.base.scale))
                             for r in resid], dtype=torch.uint8)
        assert (payload[:, :n] != want).float().mean() <= 0.01, src
    xs = [lowrank_input(5, bases, s, torch.bfloat16, gen, nonfinite=False) for s in (0, 1)]
    payloads = torch.stack([codec.encode(x, source=s) for s, x in enumerate(xs)])
    total = codec.decode_sum_f32(payloads, hidden, [0, 1])
    each = sum(codec.decode_f32(p, hidden, source=s) for s, p in enumerate(payloads))
    torch.testing.assert_close(total, each, rtol=1e-6, atol=1e-6 * float(total.abs().max()))


def test_low_rank_part_is_what_the_block_codec_no_longer_pays_for():
    """On rows dominated by shared directions, the low-rank codec's error is a fraction of the
    plain block codec's; on rows in the basis' span (bf16 coordinates) it is near zero."""
    gen = _gen("gain")
    hidden = 512
    bases = lowrank_bases(hidden, 1, 4, gen)
    low, plain = make_codec("lowrank+fp4_e2m1/b32/e6m2/r4", bases), make_codec("fp4_e2m1/b32/e6m2")
    x = lowrank_input(64, bases, 0, torch.float32, gen, nonfinite=False)
    err = lambda c: (c.decode_f32(c.encode(x, source=0), hidden, source=0) - x).norm() / x.norm()
    assert err(low) < 0.3 * err(plain)
    # coded coordinates: their error lands in the residual, so the row still gains
    coded = make_codec("lowrank+fp4_e2m1/b32/e6m2/r32/cfp4_e2m1", lowrank_bases(hidden, 1, 32, gen))
    x = lowrank_input(64, coded.bases, 0, torch.float32, gen, nonfinite=False)
    assert err(coded) < 0.3 * err(plain)
    span = torch.randn(8, 4, generator=gen).to(torch.bfloat16).float() @ low.bases[0]
    back = low.decode_f32(low.encode(span, source=0), hidden, source=0)
    assert (back - span).norm() < 1e-4 * span.norm()


@pytest.mark.parametrize("spec", ["lowrank+fp4_e2m1/b32/e6m2/r2", "lowrank+fp4_e2m1/b16/e6m2/r32/cfp4_e2m1"])
def test_nonfinite_values_poison_only_their_row(spec):
    gen = _gen("nan", spec)
    codec_spec = parse_codec_spec(spec)
    bases = lowrank_bases(96, 1, codec_spec.rank, gen)
    codec = make_codec(codec_spec, bases)
    x = lowrank_input(4, bases, 0, torch.float32, gen, nonfinite=False)
    x[1, 5], x[2, 9] = float("nan"), float("-inf")
    out = codec.decode_f32(codec.encode(x, source=0), 96, source=0)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()


def test_codec_rejects_bad_bases_and_shapes():
    spec = parse_codec_spec("lowrank+fp4_e2m1/b32/r4")
    with pytest.raises(ValueError, match="needs a calibration file"):
        make_codec(spec)
    with pytest.raises(ValueError, match=r"\[sources, 4, hidden\]"):
        make_codec(spec, torch.zeros(3, 2, 64))
    with pytest.raises(ValueError, match="non-finite"):
        make_codec(spec, torch.full((3, 4, 64), float("nan")))
    codec = make_codec(spec, torch.zeros(3, 4, 64))
    with pytest.raises(ValueError, match="hidden size 64"):
        codec.encode(torch.zeros(2, 96))
    with pytest.raises(ValueError, match="source 2 is not one of the 2 calibrated ranks"):
        codec.encode(torch.zeros(2, 64), source=2)


def test_sketch_matches_brute_force_svd_and_recovers_planted_directions():
    """Streamed in windows of uneven size, the sketch's leading directions span what an SVD of
    all (row-normalized) rows at once gives, and the planted directions."""
    gen = _gen("sketch")
    hidden, planted = 96, 3
    q = torch.linalg.qr(torch.randn(hidden, planted, generator=gen)).Q.T
    windows = [torch.randn(2, n, planted, generator=gen) * torch.tensor([8.0, 4.0, 2.0]) @ q
               + 0.01 * torch.randn(2, n, hidden, generator=gen) for n in (50, 7, 33)]
    sk = None
    for w in windows:
        sk = sketch_rows(sk, w)
    basis = sketch_basis(sk)
    assert basis.shape == (2, SKETCH_ROWS, hidden)
    rows = torch.cat(windows, dim=1).double()
    rows = rows / rows.norm(dim=-1, keepdim=True)
    ref = torch.linalg.svd(rows, full_matrices=False).Vh[:, :planted].float()
    for s in range(2):
        overlap = (basis[s, :planted] @ ref[s].T).pow(2).sum() / planted  # 1: the same subspace
        assert overlap > 0.999
        assert (basis[s, :planted] @ q.T).pow(2).sum() / planted > 0.999
        torch.testing.assert_close(basis[s] @ basis[s].T, torch.eye(SKETCH_ROWS), atol=1e-5, rtol=0)
    # a source that only ever saw zeros gets zero directions (they project to nothing)
    assert torch.equal(sketch_basis(sketch_rows(None, torch.zeros(1, 5, hidden))), torch.zeros(1, SKETCH_ROWS, hidden))


def test_calibration_file_round_trip_and_old_files(tmp_path):
    gen = _gen("file")
    hidden, tp = 64, 2
    stats = {"decoder.layers.0.mlp.linear_fc2": (-torch.rand(tp + 1, hidden, generator=gen),
                                                 torch.rand(tp + 1, hidden, generator=gen))}
    bases = {n: lowrank_bases(hidden, tp, SKETCH_ROWS, gen) for n in stats}
    cal = build_calibration(stats, bases=bases, model="m", tp=tp, ratio=16, tokens=10, text="t")
    save_calibration(str(tmp_path / "c.safetensors"), cal)
    back = load_calibration(str(tmp_path / "c.safetensors"))
    assert back.meta["version"] == 2 and torch.equal(back.bases[next(iter(stats))], next(iter(bases.values())))
    assert back.digest() == load_calibration(str(tmp_path / "c.safetensors")).digest()
    assert back.digest() != load_calibration(str(tmp_path / "c.safetensors")).__class__(
        meta=back.meta, stats=back.stats, channels=back.channels).digest()  # the bases are part of it
    codecs = layer_codecs("lowrank+fp4_e2m1/b32/e6m2/r3", stats, back)
    want = bases["decoder.layers.0.mlp.linear_fc2"][:, :3].to(torch.bfloat16).float()  # rounded once by the codec
    assert torch.equal(codecs["decoder.layers.0.mlp.linear_fc2"].bases, want)
    with pytest.raises(ValueError, match=f"holds {SKETCH_ROWS} directions.*--directions"):
        back.basis("decoder.layers.0.mlp.linear_fc2", SKETCH_ROWS + 1)
    with pytest.raises(ValueError, match="no bases for layer"):
        back.basis("decoder.layers.1.mlp.linear_fc2", 2)
    with pytest.raises(ValueError, match=r"expected \[tp \+ 1 = 3, rank, 64\]"):
        build_calibration(stats, bases={n: b[:2] for n, b in bases.items()}, model="m", tp=tp, tokens=10, text="t")
    old = Calibration(meta={**cal.meta}, stats=cal.stats, channels=cal.channels)  # as a version 1 file holds
    with pytest.raises(ValueError, match="no low-rank bases.*re-run tools/calibrate.py"):
        layer_codecs("lowrank+fp4_e2m1/b32/r3", stats, old)


def test_gate_asks_more_of_the_costlier_kernels():
    """The low-rank kernels cost ~5x the block codec's: the gate wants a message that much larger
    on slow links, and never compresses with them over NVLink (unless min_bytes forces it)."""
    from tpcomp_megatron.comm import GatePolicy

    hidden = 4096
    block = make_codec("fp4_e2m1/b32/e6m2")
    low = make_codec("lowrank+fp4_e2m1/b32/e6m2/r4", torch.zeros(3, 4, hidden))
    for link in ("pcie_class", "network_class"):
        gate = GatePolicy(link=link)
        ratio = gate.threshold(2, low, hidden) / gate.threshold(2, block, hidden)
        saving = (1 - block.bits_per_value(hidden) / 16) / (1 - low.bits_per_value(hidden) / 16)
        assert ratio == pytest.approx(low.kernel_cost * saving, rel=1e-6)
    assert GatePolicy(link="nvlink").threshold(2, low, hidden) >= 1 << 62
    assert GatePolicy(link="nvlink").threshold(2, block, hidden) < 1 << 40
    assert GatePolicy(link="nvlink", min_bytes=0).threshold(2, low, hidden) == 0
    # a codebook element (select-chain decode) costs more again, alone and under the low-rank part
    lloyd = make_codec("lloyd4/b32/e6m2")
    low_lloyd = make_codec("lowrank+lloyd4/b32/e6m2/r4", torch.zeros(3, 4, hidden))
    gate = GatePolicy(link="pcie_class")
    assert gate.threshold(2, lloyd, hidden) > gate.threshold(2, block, hidden)
    assert low_lloyd.kernel_cost == pytest.approx(low.kernel_cost * lloyd.kernel_cost)
    assert GatePolicy(link="nvlink").threshold(2, lloyd, hidden) >= 1 << 62
