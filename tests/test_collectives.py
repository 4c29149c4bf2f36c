"""Compressed collectives on real gloo ranks against the exact collective and a one-process model."""

import time

import pytest
import torch
import torch.distributed as dist

from tpcomp_megatron.calibration import OutlierParams, select_outlier_channels, sketch_basis, sketch_rows
from tpcomp_megatron.codecs import REDUCED, make_codec, parse_codec_spec
from tpcomp_megatron.comm import CollectiveError, CompressedComm, GatePolicy, check_same_config
from tpcomp_megatron.testing import run_ranks

SPECS = ["fp4_e2m1/b32/e8m0", "int4/b16/bf16", "fp6_e3m2/b8", "outlier_int4/k32", "outlier+fp5_e2m2/b32",
         "lowrank+fp4_e2m1/b32/e6m2/r2", "lowrank+lloyd4/b16/e6m2/r16/cfp4_e2m1", "lloyd4/b32/e6m2d",
         "lowrank+lloyd4/b32/e6m2d/r32/cfp4_e2m1"]


def _inputs(rank, seed, shape):
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(shape, generator=gen)
    x[..., 7] *= 30  # a consistent outlier channel, as row-parallel partial sums have
    return x.to(torch.bfloat16)


def _params(world, seed, shape):
    """Calibrate on other draws of the same distribution (never the test inputs themselves)."""
    parts = torch.stack([_inputs(r, seed + 1, shape).float().reshape(-1, shape[-1]) for r in range(world)])
    src = torch.cat([parts, parts.sum(0, keepdim=True)])
    lo, hi = src.amin(1), src.amax(1)
    return OutlierParams.from_stats(lo, hi, select_outlier_channels(lo, hi, 2))


def _bases(world, seed, shape, rank):
    parts = torch.stack([_inputs(r, seed + 1, shape).float().reshape(-1, shape[-1]) for r in range(world)])
    return sketch_basis(sketch_rows(None, torch.cat([parts, parts.sum(0, keepdim=True)])))[:, :rank]


def _codec(spec, world, seed, shape):
    if spec.startswith("lowrank"):
        return make_codec(spec, _bases(world, seed, shape, parse_codec_spec(spec).rank))
    return make_codec(spec, _params(world, seed, shape) if spec.startswith("outlier") else None)


def _check_all(rank, world):
    """Every op and codec: equal to a one-process model of the algorithm, close to the exact sum."""
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    report = {}
    for i, spec in enumerate(SPECS):
        h = 128 if "e6m2d" in spec else 64  # e6m2d's scale groups are 128 values
        shape = (5, 3, h)  # 15 rows: not a multiple of 2 or 4, so two-shot pads
        codec = _codec(spec, world, i, shape)
        xs = [_inputs(r, i, shape) for r in range(world)]
        exact = sum(x.float() for x in xs)
        rows = [x.reshape(-1, h) for x in xs]
        # One-process models of each algorithm, built from the reference codec directly.
        one_shot = codec.decode_sum(torch.stack([codec.encode(r, source=s) for s, r in enumerate(rows)]), h).reshape(shape)
        m = rows[0].shape[0]
        chunk = -(-m // world)
        padded = [torch.cat([r, r.new_zeros(chunk * world - m, h)]) for r in rows]
        red = []
        for c in range(world):
            parts = torch.stack([codec.encode(p[c * chunk:(c + 1) * chunk], source=s) for s, p in enumerate(padded)])
            red.append(codec.decode(codec.encode(codec.decode_sum_f32(parts, h), source=REDUCED), h, source=REDUCED))
        two_shot = torch.cat(red)[:m].reshape(shape)
        for algo, model in (("one_shot", one_shot), ("two_shot", two_shot)):
            out = comm.all_reduce(xs[rank], codec, algorithm=algo)
            assert out.dtype == torch.bfloat16 and out.shape == shape
            assert torch.equal(out, model), f"{spec} {algo} differs from the one-process model"
            report[(spec, algo)] = (out.float() - exact).abs().max().item() / exact.abs().max().item()
            gathered = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(gathered, out)
            assert all(torch.equal(g, out) for g in gathered), "ranks disagree"
        # reduce-scatter along dim 0 (sequence parallel layout [s, b, h]); s must divide
        xs_rs = [_inputs(r, i + 50, (4 * world, 2, h)) for r in range(world)]
        rs = comm.reduce_scatter(xs_rs[rank], codec)
        s = 4
        mine = [x[rank * s:(rank + 1) * s].reshape(-1, h) for x in xs_rs]
        want = codec.decode_sum(torch.stack([codec.encode(r, source=j) for j, r in enumerate(mine)]), h)
        assert torch.equal(rs.reshape(-1, h), want) and rs.shape == (s, 2, h)
        # all-gather along dim 0: every shard decoded, own shard included (block codecs: the
        # sequence-parallel all-gather moves layer inputs, for which nothing is calibrated)
        if not spec.startswith(("outlier", "lowrank")):
            ag = comm.all_gather(xs[rank], codec)
            want = torch.cat([codec.decode(codec.encode(x.reshape(-1, h)), h).reshape(shape) for x in xs])
            assert torch.equal(ag, want)
    return report, comm.stats.calls_compressed, comm.stats.calls_fallback


@pytest.mark.parametrize("world", [2, 4])
def test_compressed_collectives_match_models_and_exact_sum(world):
    results = run_ranks(_check_all, world)
    report, compressed, fallback = results[0]
    gathers = sum(not s.startswith(("outlier", "lowrank")) for s in SPECS)  # block codecs also all-gather
    assert fallback == 0 and compressed == len(SPECS) * 3 + gathers
    for (spec, algo), rel in report.items():
        # Relative to the largest |sum|: each rank adds at most half a step of its block's top
        # binade (FP4: 1/6 of the block max... <= 1/4 with E8M0 saturation), so N ranks' errors
        # stay well under 0.25 of the max; 8-bit and hybrid codecs far below.
        assert rel < 0.25, (spec, algo, rel)


def _check_fallbacks(rank, world):
    out = {}
    exact_policy = CompressedComm(policy=GatePolicy(min_bytes=1 << 30, link="cpu"))
    codec = make_codec("fp4_e2m1/b32")
    x = _inputs(rank, 3, (6, 64))
    ref = x.clone()
    dist.all_reduce(ref)
    out["small"] = torch.equal(exact_policy.all_reduce(x, codec), ref)
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    y = _inputs(rank, 4, (6, 48))  # 48 is not a multiple of the block size 32
    ref_y = y.clone()
    dist.all_reduce(ref_y)
    out["hidden"] = torch.equal(comm.all_reduce(y, codec), ref_y)
    z = torch.arange(64 * 2, dtype=torch.int32).reshape(2, 64) * (rank + 1)
    ref_z = z.clone()
    dist.all_reduce(ref_z)
    out["dtype"] = torch.equal(comm.all_reduce(z, codec), ref_z)
    rs = torch.randn(3, 64)  # 3 rows do not split over 2 ranks: exact path, which names the problem
    try:
        comm.reduce_scatter(rs, codec)
        out["rs"] = "no error"
    except ValueError as e:
        out["rs"] = str(e)
    out["reasons"] = dict(comm.stats.fallback_reasons)
    out["inputs_untouched"] = torch.equal(x, _inputs(rank, 3, (6, 64)))
    return out


def test_fallback_paths_are_exact():
    for out in run_ranks(_check_fallbacks, 2):
        assert out["small"] and out["hidden"] and out["dtype"] and out["inputs_untouched"]
        assert "divisible by the world size" in out["rs"]
        assert any("block size" in r for r in out["reasons"]) and any("int32" in r for r in out["reasons"])


def _single(rank, world):
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    x = torch.randn(4, 64)
    return comm.all_reduce(x, make_codec("int4")) is x and comm.reduce_scatter(x, make_codec("int4")) is x


def test_world_size_one_is_a_no_op():
    assert run_ranks(_single, 1) == [True]


def _kept_vs_fresh(rank, world):
    """Calls with kept payload buffers (comm/engine.py) and with buffers allocated per call side by
    side on the same inputs: shapes, dtypes, codecs and gate answers changing from call to call (a
    stale kit or view would give another answer)."""
    policy = GatePolicy(min_bytes=1000, link="cpu")  # [world, 64]: the exact path
    fast, slow = CompressedComm(policy=policy), CompressedComm(policy=policy, keep_buffers=False)
    codecs = [make_codec("fp4_e2m1/b32/e6m2"), make_codec("int4/b16/bf16"), None]
    shapes = [(4 * world, 64), (2 * world, 3, 64), (world, 64), (4 * world, 96)]
    gen = torch.Generator().manual_seed(rank)
    mismatches = []
    for step in range(40):
        codec = codecs[step % 3]
        shape = shapes[(step // 3) % 4]
        dtype = (torch.bfloat16, torch.float32)[(step // 12) % 2]
        x = torch.randn(shape, generator=gen).to(dtype)
        for op, kw in (("all_reduce", {"algorithm": "one_shot"}), ("all_reduce", {"algorithm": "two_shot"}),
                       ("all_reduce", {}), ("reduce_scatter", {}), ("all_gather", {})):
            if op == "all_gather" and codec is None:
                continue
            a, b = getattr(fast, op)(x, codec, **kw), getattr(slow, op)(x, codec, **kw)
            if not (torch.equal(a, b) and a.shape == b.shape and a.dtype == b.dtype):
                mismatches.append((step, op, kw, shape, dtype, codec and codec.spec))
    same_stats = (fast.stats.calls_compressed, fast.stats.calls_fallback, fast.stats.bytes_sent,
                  fast.stats.bytes_baseline, fast.stats.fallback_reasons) == (
        slow.stats.calls_compressed, slow.stats.calls_fallback, slow.stats.bytes_sent, slow.stats.bytes_baseline,
        slow.stats.fallback_reasons)
    return (mismatches, same_stats, fast.kits.built, fast.kits.kept_bytes, slow.kits.kept_bytes,
            fast.stats.calls_compressed, fast.stats.calls_fallback)


@pytest.mark.parametrize("world", [2, 4])
def test_kept_buffers_equal_fresh_ones(world):
    for mismatches, same_stats, kits, kept, kept_slow, compressed, fallback in run_ranks(_kept_vs_fresh, world):
        assert not mismatches and same_stats
        assert kits > 4 and kept > 0 and kept_slow == 0 and compressed > 0 and fallback > 0


def _mismatch(rank, world):
    try:
        check_same_config("fp4_e2m1/b32/e8m0" if rank == 0 else "int4/b32/e8m0")
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_with_different_configs_fail_at_setup():
    for msg in run_ranks(_mismatch, 2):
        assert "different compression configurations" in msg and "rank 1: int4/b32/e8m0" in msg


def _dies(rank, world):
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    dist.barrier()
    if rank == 1:
        return "left"
    t0 = time.monotonic()
    try:
        comm.all_reduce(torch.randn(8, 64), make_codec("fp4_e2m1"))
    except CollectiveError as e:
        return ("raised", time.monotonic() - t0, str(e))
    return ("returned", time.monotonic() - t0, "")


def test_dead_peer_fails_within_timeout():
    res = run_ranks(_dies, 2, pg_timeout_s=5, timeout_s=60)
    status, elapsed, msg = res[0]
    assert status == "raised" and elapsed < 30, res[0]
    assert "compressed all-reduce" in msg and "peer may have died" in msg


def test_gate_never_compresses_below_its_host_cost():
    """However low a threshold table goes, the gate asks a message to save, in link time, at least
    the host time a compressed call adds (gate.HOST_EXTRA_US), per link class and algorithm."""
    from tpcomp_megatron.codecs import make_codec
    from tpcomp_megatron.comm import GatePolicy
    from tpcomp_megatron.comm.gate import HOST_EXTRA_US, LINK_BYTES_PER_S

    codec = make_codec("fp4_e2m1/b32/e6m2")
    saving = 1 - codec.bits_per_value(5120) / 16
    for link in ("nvlink", "pcie_class", "network_class"):
        policy = GatePolicy(link=link, thresholds={(link, 2): 0})
        for algo in ("one_shot", "two_shot"):
            want = int(HOST_EXTRA_US[algo] * 1e-6 * LINK_BYTES_PER_S[link] / saving)
            assert policy.threshold(2, codec, 5120, algorithm=algo) == want > 0
        assert policy.threshold(2, codec, 5120, algorithm="two_shot") > policy.threshold(2, codec, 5120)
        assert GatePolicy(link=link, min_bytes=0).threshold(2, codec, 5120, algorithm="two_shot") == 0
        # a table above the floor is the answer, unchanged
        high = GatePolicy(link=link, thresholds={(link, 2): 1 << 40})
        assert high.threshold(2, codec, 5120, algorithm="two_shot") == int((1 << 40) * (1 - 4.25 / 16) / saving)


def _odd_shapes(rank, world):
    """Scalars, empty tensors, 1-D and non-contiguous inputs: the exact collective, as the README
    says, or (no dim 0 to split or gather) a clear error; never an IndexError from inside."""
    comm = CompressedComm(None, GatePolicy(min_bytes=0, link="cpu"))
    codec = make_codec("fp4_e2m1/b32/e6m2")
    got = {}
    scalar = torch.tensor(float(rank + 1))
    got["scalar"] = comm.all_reduce(scalar, codec).item()
    for shape in ((4, 0), (0, 64)):
        out = comm.all_reduce(torch.zeros(shape), codec)
        got[f"empty{shape}"] = tuple(out.shape)
        got[f"rs empty{shape}"] = tuple(comm.reduce_scatter(torch.zeros(shape), codec).shape) if shape[0] else None
    one_d = torch.arange(8.0) + rank
    got["rs 1-D"] = comm.reduce_scatter(one_d, codec).tolist()
    base = torch.randn(64, 6, generator=torch.Generator().manual_seed(rank))
    strided = base.t()[:, :48]  # [6, 48] not contiguous; hidden 48 is no multiple of 32: exact
    got["strided"] = torch.equal(comm.all_reduce(strided, codec), _exact_sum(strided, world))
    for name, fn in (("ag scalar", lambda: comm.all_gather(scalar, codec)),
                     ("rs scalar", lambda: comm.reduce_scatter(scalar, codec))):
        try:
            fn()
            got[name] = None
        except ValueError as e:
            got[name] = str(e)
    return got


def _exact_sum(x, world):
    out = x.contiguous().clone()
    dist.all_reduce(out)
    return out


def test_scalars_empty_and_1d_tensors_fall_back_or_fail_clearly():
    for rank, got in enumerate(run_ranks(_odd_shapes, 2)):
        assert got["scalar"] == 3.0
        assert got["empty(4, 0)"] == (4, 0) and got["empty(0, 64)"] == (0, 64)
        assert got["rs empty(4, 0)"] == (2, 0)
        assert got["rs 1-D"] == ([1.0, 3.0, 5.0, 7.0] if rank == 0 else [9.0, 11.0, 13.0, 15.0])
        assert got["strided"]
        assert "0-d tensor" in got["ag scalar"] and "0-d tensor" in got["rs scalar"]


SOAK_ELEMENTS = ("fp4_e2m1", "fp5_e2m2", "fp6_e2m3", "fp8_e4m3", "int4", "int8", "lloyd4")
SOAK_SCALES = ("e8m0", "e8m0up", "e6m2", "bf16")


def _soak(rank, world, cases):
    """Random codecs, shapes, dtypes and ops; per case (output, bound on |output - exact|)."""
    rng = torch.Generator().manual_seed(2026)  # the same draws on every rank
    comm = CompressedComm(None, GatePolicy(min_bytes=0, link="cpu"))
    out = []
    for case in range(cases):
        pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=rng))]  # noqa: E731
        spec = f"{pick(SOAK_ELEMENTS)}/b{pick((8, 16, 32, 64))}/{pick(SOAK_SCALES)}"
        codec = make_codec(spec)
        hidden = pick((24, 32, 64, 96, 128, 160))
        rows = 2 * int(torch.randint(1, 20, (1,), generator=rng))  # even: the reduce-scatter splits
        dtype = pick((torch.bfloat16, torch.float16, torch.float32))
        op = pick(("one_shot", "two_shot", "reduce_scatter", "all_gather"))
        scale = float(torch.rand(1, generator=rng)) * 100
        xs = [(torch.randn(rows, hidden, generator=torch.Generator().manual_seed(case * 7 + r)) * scale).to(dtype)
              for r in range(world)]
        x = xs[rank]
        if op == "all_gather":
            got = comm.all_gather(x, codec)
            exact = torch.cat(xs).float()
            err = torch.cat([_recon_err(codec, t) for t in xs])
        else:
            got = (comm.reduce_scatter(x, codec) if op == "reduce_scatter"
                   else comm.all_reduce(x, codec, algorithm=op))
            exact = sum(t.float() for t in xs)
            err = sum(_recon_err(codec, t) for t in xs)
            if op == "two_shot":  # the middle requantizes the sum of the decoded contributions
                err = err + _recon_err(codec, sum(_decoded(codec, t) for t in xs))
            if op == "reduce_scatter":
                lo = rank * rows // world
                exact, err = exact[lo:lo + rows // world], err[lo:lo + rows // world]
        # plus the output's rounding to its dtype, relative to the output's own size
        bound = err + (exact.abs() + err) * 2.0 ** -(7 if dtype == torch.bfloat16 else 10) + 1e-30
        ok = bool((((got.float() - exact).abs() <= bound * 1.001) | (got.float() == exact)).all())
        out.append((spec, op, str(dtype), rows, hidden, ok, got))
    return out


def _decoded(codec, t):
    """What the reference codec makes of `t` (t itself where the gate keeps it exact)."""
    if codec.ineligible(t.shape[-1]):
        return t.float()
    rows = t.float().reshape(-1, t.shape[-1])
    return codec.decode_f32(codec.encode(rows), t.shape[-1]).reshape(t.shape)


def _recon_err(codec, t):
    """|t - decode(encode(t))| per element with the reference codec, or 0 where the gate keeps
    the collective exact (hidden not a multiple of the block)."""
    return (t.float() - _decoded(codec, t)).abs()


def test_soak_random_collectives_within_the_codec_bound_and_equal_on_every_rank():
    """A few hundred random cases (block codecs of every element, block and scale; rows, hidden
    sizes that do and do not divide; three dtypes; all four collectives) on two gloo ranks: every
    output within the sum of the ranks' own reconstruction errors (plus the requantization of
    the two-shot middle, plus the output's rounding) of the exact result, and, for the
    replicated outputs, bit for bit the same on both ranks."""
    ranks = run_ranks(_soak, 2, 240, timeout_s=240)
    for (spec, op, dtype, rows, hidden, ok, got), (_, _, _, _, _, ok1, got1) in zip(*ranks):
        assert ok and ok1, (spec, op, dtype, rows, hidden)
        if op != "reduce_scatter":
            assert torch.equal(got, got1), ("ranks disagree", spec, op, dtype, rows, hidden)


def _transport_fallback(rank, world):
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("tpcomp_megatron").addHandler(handler)
    codec = make_codec("fp4_e2m1/b32/e6m2")
    x = _inputs(rank, 3, (6, 64))
    symm = [CompressedComm(None, GatePolicy(link="nvlink", transport="symm_mem", min_bytes=0)) for _ in range(2)]
    nccl = CompressedComm(None, GatePolicy(link="nvlink", transport="nccl", min_bytes=0))
    same = all(torch.equal(c.all_reduce(x, codec), nccl.all_reduce(x, codec)) for c in symm)
    return same, seen


def test_symmetric_memory_unavailable_falls_back_to_nccl_said_once():
    """Where symmetric memory cannot run (here: no CUDA), a policy asking for it uses NCCL's path,
    says why once per process, and gives the NCCL path's result (it used to raise)."""
    for same, seen in run_ranks(_transport_fallback, 2):
        assert same
        assert len(seen) == 1 and "symmetric-memory transport unavailable (no CUDA)" in seen[0]
