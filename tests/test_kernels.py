"""Fused Triton kernels against the reference codecs, bit for bit, in Triton's CPU interpreter
(tests/interpreted.py: how, and the tolerance: none). The plans, launches and collectives over
them: test_kernel_plans.py."""

from __future__ import annotations

import pytest
import torch

from interpreted import K, gen_for as _gen, quiet_numpy  # noqa: F401 (quiet_numpy: an autouse fixture)
from kernel_cases import (BLOCK_CASES, block_codec, check_all_ops, check_encode_feedback,
                          e6m2_boundary_rows, feedback_debt, hard_input, lowrank_bases, lowrank_input, outlier_input,
                          outlier_params, same)

from tpcomp_megatron.codecs import FORMATS, REDUCED, make_codec, parse_codec_spec

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.parametrize("element", sorted(FORMATS))
@pytest.mark.parametrize("case", range(len(BLOCK_CASES)))
def test_block_codec_bit_exact(element, case):
    block, scale, rows, hidden = BLOCK_CASES[case]
    codec = block_codec(element, block, scale)
    gen = _gen(element, case)
    n = 2 + case % 3
    # every input dtype through encode; the sources of one call share a dtype, as on a real rank
    for dtype in DTYPES:
        xs = [hard_input(rows, hidden, block, dtype, gen, fmt=element) for _ in range(n)]
        out_dtypes = (dtype,) if dtype != torch.bfloat16 else DTYPES
        check_all_ops(K, codec, xs, hidden, "cpu", out_dtypes)


@pytest.mark.parametrize("spec", ["outlier_int4", "outlier_int4/k16", "outlier+fp4_e2m1/b32",
                                  "outlier+int4/b16/bf16/k32", "outlier+fp6_e3m2/b8"])
@pytest.mark.parametrize("rows,hidden", [(17, 640), (3, 96), (1, 576)])
def test_outlier_codecs_bit_exact(spec, rows, hidden):
    gen = _gen(spec, rows, hidden)
    world = 3
    params = outlier_params(hidden, world, parse_codec_spec(spec).ratio, gen)
    codec = make_codec(spec, params)
    for dtype in DTYPES:
        xs = [outlier_input(rows, params, src, dtype, gen) for src in range(world)]
        check_all_ops(K, codec, xs, hidden, "cpu", (dtype,))


@pytest.mark.parametrize("spec", ["lowrank+fp4_e2m1/b32/e6m2/r4", "lowrank+int4/b16/bf16/r1", "lowrank+fp6_e2m3/b8/r8",
                                  "lowrank+lloyd3/b32/e6m2/r64/cfp4_e2m1", "lowrank+fp4_e2m1/b16/bf16/r48/clloyd4",
                                  "lowrank+lloyd4/b64/e6m2/r64/cfp4_e2m1", "lowrank+lloyd4/b64/e6m2/r4",
                                  "lowrank+lloyd4/b32/e6m2d/r64/cfp4_e2m1"])
@pytest.mark.parametrize("rows,hidden", [(17, 640), (3, 384)])
def test_lowrank_codec_bit_exact(spec, rows, hidden):
    """The kernels path (projection by torch, coded coordinates by the block kernels, residual by
    the block kernel, coordinates added back by it) gives the reference's bytes and values,
    sources in any order."""
    gen = _gen(spec, rows, hidden)
    world = 3
    codec = make_codec(spec, lowrank_bases(hidden, world, parse_codec_spec(spec).rank, gen))
    srcs = [2, 0, REDUCED, 1]
    for dtype in DTYPES:
        xs = [lowrank_input(rows, codec.bases, s, dtype, gen) for s in srcs]
        check_all_ops(K, codec, xs, hidden, "cpu", (dtype,), sources=srcs)


@pytest.mark.parametrize("spec,rows,hidden", [(s, r, h) for s in ["fp4_e2m1/b32/e6m2", "lloyd4/b32/e6m2", "int4/b16/bf16",
                                                                    "fp6_e2m3/b8/e8m0up", "fp5_e2m2/b32/e8m0"]
                                               for r, h in [(17, 640), (3, 96)]]
                         + [("lloyd4/b32/e6m2d", 17, 640), ("fp4_e2m1/b16/e6m2d", 3, 384)])
def test_encode_feedback_bit_exact(spec, rows, hidden):
    """Error feedback fused into the encode = the reference's send, encode, decode and settle."""
    codec = make_codec(spec)
    gen = _gen("feedback", spec, rows, hidden)
    for dtype in DTYPES:
        x = hard_input(rows, hidden, codec.spec.block, dtype, gen, fmt=codec.spec.element)
        check_encode_feedback(K, codec, x, feedback_debt(x, gen), 1, "cpu")


@pytest.mark.parametrize("spec", ["lowrank+fp4_e2m1/b32/e6m2/r4", "lowrank+lloyd4/b16/bf16/r2",
                                  "lowrank+lloyd4/b32/e6m2/r64/cfp4_e2m1", "lowrank+lloyd4/b64/e6m2/r64/cfp4_e2m1",
                                  "lowrank+lloyd4/b32/e6m2d/r64/cfp4_e2m1"])
def test_lowrank_encode_feedback_bit_exact(spec):
    gen = _gen("feedback", spec)
    codec = make_codec(spec, lowrank_bases(384, 3, parse_codec_spec(spec).rank, gen))
    for dtype, src in zip(DTYPES, [2, REDUCED, 0]):
        x = lowrank_input(5, codec.bases, src, dtype, gen)
        check_encode_feedback(K, codec, x, feedback_debt(x, gen), src, "cpu")


def test_encode_feedback_refuses_what_it_cannot_fuse():
    codec = make_codec("fp4_e2m1/b32")
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="contiguous float32 tensor of the input's shape"):
        K.encode_feedback(codec, x, torch.zeros(3, 64, dtype=torch.bfloat16), source=0)
    with pytest.raises(ValueError, match="contiguous float32 tensor of the input's shape"):
        K.encode_feedback(codec, x, torch.zeros(3, 32), source=0)
    params = outlier_params(64, 2, 32, _gen("fb-err"))
    with pytest.raises(ValueError, match="no fused error-feedback encode for HybridCodec"):
        K.encode_feedback(make_codec("outlier+fp4_e2m1/b32/k32", params), x, torch.zeros(3, 64), source=0)


def test_sources_in_any_order_and_reduced_rows():
    """Per-source tables: sources out of order, repeated, and REDUCED (-1 = the last row)."""
    gen = _gen("sources")
    params = outlier_params(128, 3, 32, gen)
    codec = make_codec("outlier_int4/k32", params)
    srcs = [2, 0, REDUCED, 0]
    xs = [outlier_input(5, params, s, torch.float32, gen) for s in srcs]
    check_all_ops(K, codec, xs, 128, "cpu", (torch.float32,), sources=srcs)


def test_all_codes_decode_exactly():
    """Every byte value in every code and scale position decodes as in the reference."""
    gen = _gen("codes")
    for element in sorted(FORMATS):
        for scale in ("e8m0", "e6m2", "bf16"):
            codec = block_codec(element, 8, scale)
            hidden = 8 * 32
            p = torch.randint(0, 256, (2, 4, codec.row_bytes(hidden)), dtype=torch.uint8, generator=gen)
            p[0, 0, : 256 * codec.fmt.bits // 8] = torch.arange(256, dtype=torch.uint8)[: 256 * codec.fmt.bits // 8]
            want = codec.decode_sum(p, hidden, [0, 1], dtype=torch.float32)
            assert same(K.decode_sum(codec, p, hidden, sources=[0, 1], dtype=torch.float32), want), element


def test_int64_indexing_path(monkeypatch):
    """Offsets past 2**31 switch the kernels to int64 indices; force that path on small shapes."""
    monkeypatch.setattr(K.launch, "INT32_LIMIT", 0)
    gen = _gen("i64")
    params = outlier_params(96, 2, 32, gen)
    for spec in ("fp6_e2m3/b32", "outlier+fp4_e2m1/b32/k32", "outlier_int4/k32"):
        codec = make_codec(spec, params)
        xs = [outlier_input(3, params, s, torch.bfloat16, gen) for s in range(2)]
        check_all_ops(K, codec, xs, 96, "cpu", (torch.bfloat16,))


def test_zero_rows_and_noncontiguous_input():
    codec = make_codec("fp4_e2m1/b32")
    assert K.encode(codec, torch.zeros(0, 64), source=0).shape == (0, codec.row_bytes(64))
    x = torch.randn(64, 6)[:, :4].t()  # [4, 64], not contiguous
    assert same(K.encode(codec, x, source=0), codec.encode(x))


def test_errors_name_the_valid_choices():
    codec = make_codec("int4/b32")
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        K.encode(codec, torch.randn(2, 48), source=0)
    with pytest.raises(ValueError, match="dtype"):
        K.encode(codec, torch.ones(2, 64, dtype=torch.int32), source=0)
    with pytest.raises(ValueError, match=r"expected \[n >= 1, rows, 34\]"):
        K.decode_sum(codec, torch.zeros(2, 3, 35, dtype=torch.uint8), 64, sources=[0, 1], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="2 sources given for 3 payloads"):
        K.decode_sum(codec, torch.zeros(3, 3, 34, dtype=torch.uint8), 64, sources=[0, 1], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="output dtype"):
        K.decode_each(codec, torch.zeros(1, 3, 34, dtype=torch.uint8), 64, sources=[0], dtype=torch.int8)
    with pytest.raises(ValueError, match="supported: .*BlockCodec"):
        K.encode(object(), torch.randn(2, 64), source=0)
    params = outlier_params(64, 2, 32, _gen("err"))
    with pytest.raises(ValueError, match="source 5 out of range"):
        K.encode(make_codec("outlier_int4/k32", params), torch.randn(2, 64), source=5)


@pytest.mark.parametrize("spec", ["fp5_e3m1/b16/bf16", "outlier+fp4_e2m1/b32/k16", "outlier_int4/k16"])
def test_custom_ops_trace_with_fake_tensors(spec):
    """The ops' fake implementations agree with the real ones (schema, shapes, dtypes)."""
    gen = _gen("fake", spec)
    params = outlier_params(64, 2, 16, gen)
    codec = make_codec(spec, params)
    x = outlier_input(3, params, 0, torch.float32, gen, nonfinite=False)
    p = torch.stack([codec.encode(x)] * 2)
    utils = ("test_schema", "test_faketensor")
    if spec.startswith("outlier_int4"):
        t = K.tables.outlier_tables(codec, x.device)
        torch.library.opcheck(torch.ops.tpcomp.static_encode.default, (x, t.lo, t.inv, t.chan, 0), test_utils=utils)
        for mode in ("sum", "each", "encode"):
            args = (p, 64, t.lo, t.step, t.lo, t.inv, t.slot, t.chan, t.first, list(t.window_max), 0, 1, mode, 2,
                    torch.bfloat16)
            torch.library.opcheck(torch.ops.tpcomp.static_decode.default, args, test_utils=utils)
        return
    block_args = K.api._block_args(codec, 64, x.device)
    torch.library.opcheck(torch.ops.tpcomp.block_encode.default, (x, *block_args, codec.row_bytes(64)),
                          test_utils=utils)
    for mode in ("sum", "each", "encode"):
        torch.library.opcheck(torch.ops.tpcomp.block_decode.default, (p, 64, *block_args, mode, torch.bfloat16),
                              test_utils=utils)


def test_checkout_root_shadows_no_dependency():
    """`python -m ...` puts a checkout's root first on sys.path. A top-level folder there named
    like a dependency's import name would replace it: `kernels/` once replaced Hugging Face's
    `kernels`, which transformers 5.x requires, and model loading failed. The checkout's top-level
    packages must be ours alone."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    top = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    assert top == {"tpcomp_megatron"}, f"top-level packages besides ours: {sorted(top - {'tpcomp_megatron'})}"


@pytest.mark.parametrize("element", sorted(FORMATS))
def test_e8m0up_boundaries(element):
    """Block maxima exactly at max_value * 2**s (kept), one float above (rounded up), below,
    subnormal and huge: the kernel's mantissa test agrees with the reference's comparison."""
    codec = block_codec(element, 8, "e8m0up")
    m = codec.fmt.max_value
    maxima = []
    for e in (-140, -130, -126, -3, 0, 5, 100, 120):
        at = torch.tensor(m * 2.0 ** e, dtype=torch.float32)
        maxima += [at, torch.nextafter(at, torch.tensor(float("inf"))), torch.nextafter(at, torch.tensor(0.0))]
    maxima += [torch.tensor(3.0e38), torch.tensor(1e-45), torch.tensor(0.0)]
    gen = _gen("e8m0up", element)
    rows = torch.rand(len(maxima), 8, generator=gen) * 0.5
    rows[:, 3] = torch.stack(maxima) * torch.where(torch.rand(len(maxima), generator=gen) < 0.5, -1.0, 1.0)
    x = rows  # one block a row
    assert same(K.encode(codec, x, source=0), codec.encode(x, source=0))


@pytest.mark.parametrize("element", ["fp4_e2m1", "int8", "fp6_e3m2"])
def test_e6m2_boundaries(element):
    """Scale rounding ties, range ends, subnormal and zero maxima (kernel_cases.e6m2_boundary_rows):
    kernel and reference pick the same scale byte and codes."""
    codec = block_codec(element, 8, "e6m2")
    rows = e6m2_boundary_rows(codec, _gen("e6m2", element))
    assert same(K.encode(codec, rows, source=0), codec.encode(rows, source=0))
