"""The kernels' launch plans, launches and routes, and the collectives over them, in Triton's CPU
interpreter (tests/interpreted.py): eager plans and custom ops give the same bytes, plans never go
stale, the collectives' kits and padded calls give the reference's bytes, the fast launch and its
fallbacks, torch.compile records the custom ops."""

from __future__ import annotations

import pytest
import torch

from interpreted import K, gen_for as _gen, quiet_numpy  # noqa: F401 (quiet_numpy: an autouse fixture)
from graph_cases import OPS, call as call_op, every_op, padded_call
from kernel_cases import (feedback_debt, hard_input, lowrank_bases, lowrank_input, outlier_input,
                          outlier_params, same)

from tpcomp_megatron.codecs import REDUCED, make_codec, parse_codec_spec


def _codec_and_inputs(spec: str, hidden: int, n: int, gen: torch.Generator, *, nonfinite: bool = True):
    """A codec of `spec` calibrated for `n` sources (low-rank bases, or outlier parameters for the
    rest) and 5 bf16 rows per source inside its calibration (`nonfinite`: outlier rows may hold
    NaN/Inf)."""
    if spec.startswith("lowrank"):
        bases = lowrank_bases(hidden, n, parse_codec_spec(spec).rank, gen)
        return make_codec(spec, bases), [lowrank_input(5, bases, s, torch.bfloat16, gen) for s in range(n)]
    params = outlier_params(hidden, n, 32, gen)
    return make_codec(spec, params), [outlier_input(5, params, s, torch.bfloat16, gen, nonfinite=nonfinite)
                                      for s in range(n)]



@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e6m2", "lloyd4/b32/e6m2d", "int8/b16/bf16", "outlier_int4/k32",
                                  "outlier+fp4_e2m1/b32/k32", "lowrank+fp4_e2m1/b32/e6m2/r4",
                                  "lowrank+lloyd4/b32/e6m2/r32/cfp4_e2m1"])
def test_eager_plans_match_custom_ops(spec):
    """The eager path (cached plans, no custom-op dispatch) and the custom ops' path (what
    torch.compile runs) give identical bytes for every codec family, built and replayed."""
    from kernel_cases import check_eager_matches_custom_ops

    gen = _gen("plans", spec)
    hidden, n = 256, 3
    codec, xs = _codec_and_inputs(spec, hidden, n, gen)
    check_eager_matches_custom_ops(K, codec, xs, hidden, "cpu", feedback=isinstance(codec, K.FEEDBACK_CODECS))


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e6m2", "lloyd4/b32/e6m2d", "outlier_int4/k32",
                                  "outlier+fp4_e2m1/b32/k32", "lowrank+fp4_e2m1/b32/e6m2/r4"])
def test_decode_plans_write_into_a_given_output(spec):
    """A decode plan given `out` (as a CUDA graph's static output, comm/graphs.py) writes the
    bytes it would return, into `out` itself, for every mode; a view into a larger buffer too."""
    gen = _gen("out", spec)
    hidden, n = 256, 3
    codec, xs = _codec_and_inputs(spec, hidden, n, gen, nonfinite=False)
    p = torch.stack([K.encode(codec, x, source=s) for s, x in enumerate(xs)])
    for mode, dtype in (("sum", torch.bfloat16), ("each", torch.float32), ("encode", torch.float32)):
        plan = K.api.prepare_decode(codec, p, hidden, sources=list(range(n)), dtype=dtype, mode=mode,
                                    out_source=REDUCED if mode == "encode" else 0)
        want = plan(p)
        big = torch.full((want.shape[0] + 3,) + tuple(want.shape[1:]), 7, dtype=want.dtype)
        got = plan(p, out=big[1:1 + want.shape[0]])
        assert got.data_ptr() == big[1:].data_ptr() and same(got, want), (spec, mode)
        assert (big[0] == 7).all() and (big[1 + want.shape[0]:] == 7).all(), "wrote outside out"


def test_plans_never_reuse_a_stale_configuration():
    """A plan is built per (codec, shape, dtype, device, sources): calls that change rows, hidden,
    dtype, codec, source or the payloads' sources each get the reference's bytes, in any order."""
    gen = _gen("stale")
    params = outlier_params(128, 2, 32, gen)
    codecs = [make_codec("fp4_e2m1/b32/e6m2"), make_codec("int4/b16/bf16"), make_codec("outlier_int4/k32", params)]
    shapes = [(3, 128), (7, 128), (3, 64), (1, 128)]
    for _ in range(2):  # the second round replays the plans the first one built
        for codec in codecs:
            for rows, hidden in shapes:
                if codec.ineligible(hidden):
                    continue
                for dtype in (torch.bfloat16, torch.float32):
                    for src in (0, 1):
                        x = torch.randn(rows, hidden, generator=gen).to(dtype)
                        assert same(K.encode(codec, x, source=src), codec.encode(x, source=src)), \
                            (codec.spec, rows, hidden, dtype, src)
                p = torch.stack([codec.encode(torch.randn(rows, hidden, generator=gen), source=s) for s in (0, 1)])
                for sources in ([0, 1], [1, 0]):
                    for dtype in (torch.bfloat16, torch.float16):
                        want = codec.decode_sum(p, hidden, sources, dtype=dtype)
                        got = K.decode_sum(codec, p, hidden, sources=sources, dtype=dtype)
                        assert same(got, want), (codec.spec, rows, hidden, sources, dtype)
                    got = K.decode_sum(codec, p[:1], hidden, sources=sources[:1], dtype=torch.float32)
                    assert same(got, codec.decode_sum(p[:1], hidden, sources[:1], dtype=torch.float32))


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_through_kits_match_the_reference(monkeypatch, world):
    """Collectives through the kernels (comm/engine.py: plans prepared once per row bucket and
    launched for each call's rows, payload buffers kept) give the reference codecs' bytes, call
    after call with fresh inputs and row counts that change within a bucket, split unevenly over
    the ranks (two-shot padding) or not, for every codec family and operation. One process, the
    mirror process group (every peer holds this rank's input)."""
    from tpcomp_megatron import ops
    from tpcomp_megatron.comm import CompressedComm, GatePolicy
    from tpcomp_megatron.testing.onerank import mirror_group

    with mirror_group(world):
        gen = _gen("kits", world)
        hidden = 128
        params = outlier_params(hidden, world, 32, gen)
        codecs = [make_codec("fp4_e2m1/b32/e6m2"), make_codec("outlier+fp4_e2m1/b32/k32", params),
                  make_codec("outlier_int4/k32", params),
                  make_codec("lowrank+fp4_e2m1/b32/e6m2/r4", lowrank_bases(hidden, world, 4, gen))]
        policy = GatePolicy(min_bytes=0, link="cpu")
        results = every_op

        reference = CompressedComm(policy=policy)  # reference codecs (ops' CPU dispatch)
        for codec in codecs:
            with monkeypatch.context() as m:
                m.setattr(ops, "_use_kernels", lambda t: K)
                kernels = CompressedComm(policy=policy)
            # 3 and 4 rows share a bucket (4), as do 5..8 (8); 5 and 7 do not split over 2 or 3 ranks
            for call, rows in enumerate((4, 3, 2 * world, 7, 5, 3)):
                x = (torch.randn(rows, hidden, generator=gen) * (1 + call)).to(torch.bfloat16)
                want = results(reference, codec, x)
                with monkeypatch.context() as m:
                    m.setattr(ops, "_use_kernels", lambda t: K)
                    got = results(kernels, codec, x)
                for i, (a, b) in enumerate(zip(got, want)):
                    assert same(a, b), (codec.spec, rows, i)
            assert kernels.stats.calls_fallback == 0
            assert kernels.kits.built <= 2 * 4, "a kit per operation and row bucket (4, 8), not per row count"


@pytest.mark.parametrize("world", [2, 3])
def test_padded_calls_through_kits_equal_unpadded(monkeypatch, world):
    """What a CUDA graph of a padded row count computes (comm/graphs.py: the rows copied into a
    static input whose other rows hold earlier calls' values, the result cut back) equals the
    call on the rows themselves, through the interpreted kernels, for every operation and for row
    counts padded by a few rows (37 -> 38, 45 -> 46, 70 -> 72). Not the two-shot all-reduce: the
    mirror group hands this rank its own reduced chunk for every peer's, so its output depends on
    where the chunks split (test_graphs.py checks it on real gloo ranks)."""
    from tpcomp_megatron import ops
    from tpcomp_megatron.comm import CompressedComm, GatePolicy
    from tpcomp_megatron.testing.onerank import mirror_group

    monkeypatch.setattr(ops, "_use_kernels", lambda t: K)
    with mirror_group(world):
        gen = _gen("padded", world)
        hidden = 128
        params = outlier_params(hidden, world, 32, gen)
        comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
        for codec in (make_codec("fp4_e2m1/b32/e6m2"), make_codec("outlier+fp4_e2m1/b32/k32", params),
                      make_codec("lloyd4/b32/e6m2d")):
            fill = hard_input(80 * world, hidden, 32, torch.bfloat16, gen, nonfinite=False)
            for rows in (37, 45, 70):
                x = (torch.randn(rows * world, hidden, generator=gen) * rows).to(torch.bfloat16)
                for op in (op for op in OPS if op != "two_shot"):
                    r = x if op == "reduce_scatter" else x[:rows]
                    want = call_op(comm, op, codec, r)
                    assert same(padded_call(comm, op, codec, r, fill), want.reshape(-1, hidden)), (codec.spec, rows, op)


def test_direct_c_launch_only_for_the_known_launcher():
    """`launch._c_launch` calls Triton's C launch function directly only for a launcher whose
    `__call__` is the known `(gridX, gridY, gridZ, stream, function, *args)` without scratch
    memory; any other launcher (another signature, scratch memory, missing fields) keeps Triton's
    own call."""
    from tpcomp_megatron.kernels.launch import _c_launch

    def c_launch(*args):
        return args

    class Known:
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = False, True
        launch = staticmethod(c_launch)

        def __call__(self, gridX, gridY, gridZ, stream, function, *args):
            pass

    class Newer(Known):  # Triton 3.9 passes metadata and hooks before the scratch buffers
        def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata,
                     launch_enter_hook, launch_exit_hook, *args):
            pass

    class Scratch(Known):
        global_scratch_size = 128

    class NoLaunch(Known):
        launch = None

    assert _c_launch(Known()) == (c_launch, (False, True, None, None))
    for other in (Newer(), Scratch(), NoLaunch(), object()):
        assert _c_launch(other) is None, type(other).__name__


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e6m2", "lloyd4/b32/e6m2d", "int8/b16/bf16", "outlier+fp4_e2m1/b32/k32",
                                  "outlier_int4/k32"])
def test_decode_sum_list_reads_separate_buffers(spec):
    """`decode_sum_list` of n separately allocated payloads (peers' slots: any addresses, in any
    order, lower or higher than the first) gives `decode_sum` of them stacked, bit for bit; calls
    with the same buffers reuse the plan's source table, new buffers get their own."""
    gen = _gen("list", spec)
    hidden, n = 256, 3
    params = outlier_params(hidden, n, 32, gen)
    codec = make_codec(spec, params)
    for call in range(3):
        xs = [outlier_input(5, params, s, torch.bfloat16, gen) for s in range(n)]
        # separate buffers, some carved out of a larger one at an offset (not at its start)
        payloads = [K.encode(codec, x, source=s) for s, x in enumerate(xs)]
        host = torch.zeros(payloads[1].numel() + 64, dtype=torch.uint8)
        payloads[1] = host[64:].view_as(payloads[1]).copy_(payloads[1])
        order = [2, 0, 1] if call == 1 else [0, 1, 2]
        listed = [payloads[i] for i in order]
        for dtype in (torch.bfloat16, torch.float32):
            want = K.decode_sum(codec, torch.stack(listed), hidden, sources=order, dtype=dtype)
            got = K.decode_sum_list(codec, listed, hidden, sources=order, dtype=dtype)
            assert same(got, want), (spec, call, dtype)
            assert same(got, codec.decode_sum(torch.stack(listed), hidden, order, dtype=dtype))


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e6m2", "outlier+fp4_e2m1/b32/k32", "outlier_int4/k32",
                                  "lowrank+fp4_e2m1/b32/e6m2/r4", "lowrank+lloyd4/b32/e6m2/r32/cfp4_e2m1"])
def test_custom_ops_launch_the_eager_plans_launches(monkeypatch, spec):
    """One route: an eager call and the same call through the custom ops (what torch.compile
    records, `api._traced_*`) run the very same prepared launches (`launch.Launcher` objects),
    with the same bytes."""
    gen = _gen("one-route", spec)
    hidden, n = 256, 2
    codec, xs = _codec_and_inputs(spec, hidden, n, gen)
    launched: list = []
    run = K.launch.Launcher.run
    monkeypatch.setattr(K.launch.Launcher, "run", lambda self, rows, *t: (launched.append(self), run(self, rows, *t)))

    def launches(fn):
        launched.clear()
        result = fn()
        return result, {id(x) for x in launched}

    p = torch.stack([K.encode(codec, x, source=s) for s, x in enumerate(xs)])
    calls = [(lambda: K.encode(codec, xs[1], source=1), lambda: K.api._traced_encode(codec, xs[1], 1))]
    for mode, dtype in (("sum", torch.bfloat16), ("each", torch.float32), ("encode", torch.float32)):
        calls.append((lambda mode=mode, dtype=dtype: K.api._decode(codec, p, hidden, range(n), dtype, mode, REDUCED),
                      lambda mode=mode, dtype=dtype: K.api._traced_decode(codec, p, hidden, range(n), dtype, mode,
                                                                          REDUCED)))
    for eager, traced in calls:
        want, eager_launches = launches(eager)
        got, traced_launches = launches(traced)
        assert eager_launches and traced_launches == eager_launches, spec
        assert same(got, want), spec


def test_fast_launch_off_outside_the_tested_triton(monkeypatch):
    """The capability check behind the fast launch (launch.fast_launch_supported): any Triton
    outside the tested range (>= 3.6, < 3.7) turns it off, whatever internals it has."""
    import triton

    L = K.launch
    try:
        for version in ("3.9.0", "3.5.1", "3.7.0", "4.0.0", "2.3.1", "", "unknown"):
            monkeypatch.setattr(triton, "__version__", version)
            assert "outside the versions the fast launch was tested on" in L.fast_launch_problem(), version
            L.fast_launch_supported.cache_clear()
            assert not L.fast_launch_supported(), version
        for version in ("3.6.0", "3.6.1", "3.6.0+git1234abc"):  # in range: only the internals can turn it off
            monkeypatch.setattr(triton, "__version__", version)
            problem = L.fast_launch_problem()
            assert problem is None or "outside" not in problem, (version, problem)
        assert L.triton_version("3.6.0+git1234abc") == (3, 6, 0) and L.triton_version("3.10") == (3, 10)
    finally:
        monkeypatch.undo()
        L.fast_launch_supported.cache_clear()


def test_launcher_falls_back_to_the_jit_without_the_fast_launch(monkeypatch):
    """With the capability check off, `Launcher.run` launches through Triton's JIT on every call
    (it consults the check, keeps no binary) and the launches give the reference's bytes, for
    row counts across the launcher's bucket. (Under the interpreter the fast launch is off
    anyway: CPU tensors.)"""
    codec = make_codec("fp4_e2m1/b32/e6m2")
    hidden, rb = 128, codec.row_bytes(128)
    element, block, scale, data_bytes, *_, slots_off = K.plans.block_args(codec, hidden, torch.device("cpu"))
    base = K.block.encode_launcher(8, hidden, rb, torch.bfloat16, torch.device("cpu"), element=element, block=block,
                                   scale=scale, data_bytes=data_bytes, window_max=None, slots_off=slots_off,
                                   lowrank=False, feedback=False, even=True)
    asked, jit = [], []
    monkeypatch.setattr(K.launch, "fast_launch_supported", lambda: asked.append(1) or False)

    class CountingJit:  # the kernel, counting its JIT launches
        arg_names = base.kernel.arg_names

        def __getitem__(self, grid):
            jit.append(grid)
            return base.kernel[grid]

    launch = K.launch.Launcher(CountingJit(), base.grid, base.scalars, base.constexprs, base.options, rows=base.rows,
                               row_tile=base.row_tile, row_scalars=base.row_scalars)
    gen = _gen("jit-fallback")
    for call, rows in enumerate((8, 5, 8, 7)):
        x = hard_input(rows, hidden, 32, torch.bfloat16, gen, fmt="fp4_e2m1")
        out = torch.empty(rows, rb, dtype=torch.uint8)
        K.block.run_encode(launch, rows, x, out)
        assert same(out, codec.encode(x, source=0)), rows
        assert len(jit) == len(asked) == call + 1
    assert launch.binaries == {} and launch.compiled is None


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e6m2", "outlier+fp4_e2m1/b32/k32", "outlier_int4/k32",
                                  "lowrank+lloyd4/b32/e6m2/r32/cfp4_e2m1"])
def test_torch_compile_records_the_custom_ops(spec):
    """Traced by torch.compile (fullgraph), the public functions build their plans over the custom
    ops (`steps.TRACED`): the graph holds `torch.ops.tpcomp.*` calls, and running it gives the eager
    calls' bytes (encode, the three decodes, and the fused error-feedback encode)."""
    gen = _gen("compile", spec)
    hidden, n = 256, 2
    codec, xs = _codec_and_inputs(spec, hidden, n, gen, nonfinite=False)
    feedback = isinstance(codec, K.FEEDBACK_CODECS)

    def fn(a, b, debt):
        p = torch.stack([K.encode(codec, a, source=0), K.encode(codec, b, source=1)])
        out = [p, K.decode_sum(codec, p, hidden, sources=[0, 1], dtype=torch.bfloat16),
               K.decode_each(codec, p, hidden, sources=[0, 1], dtype=torch.float32),
               K.decode_sum_encode(codec, p, hidden, sources=[0, 1], out_source=REDUCED)]
        if feedback:
            out.append(K.encode_feedback(codec, a, debt, source=0))
        return out

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    debt = feedback_debt(xs[0], gen).nan_to_num()
    want_debt = debt.clone()
    want = fn(*xs, want_debt)  # eager first: it builds the codec's device tables, which do not trace
    torch._dynamo.reset()
    try:
        got = torch.compile(fn, backend=backend, fullgraph=True)(*xs, debt)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1 and "torch.ops.tpcomp." in graphs[0]
    for i, (g, w) in enumerate(zip(got, want)):
        assert same(g, w), (spec, i)
    assert same(debt, want_debt)
