"""Fused kernels on CUDA against the CPU reference, bit for bit, plus CUDA-graph capture/replay
and torch.compile of the custom ops. Skipped without CUDA.

The reference runs on the CPU (its bytes are the definition; see tpcomp_megatron/kernels/numerics.py on NaN
patterns). Tolerance: none; NaN matches NaN. Run alone or with tests/gpu only: the CPU kernel
tests interpret the same kernels and cannot share a process with compiled ones.
"""

from __future__ import annotations

import zlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from tpcomp_megatron import kernels as K  # noqa: E402

if K.INTERPRETED:
    pytest.skip("kernels were built for the interpreter in this process", allow_module_level=True)

from kernel_cases import (block_codec, check_all_ops, check_encode_feedback, e6m2_boundary_rows,  # noqa: E402
                          feedback_debt, hard_input, lowrank_bases, lowrank_input, outlier_input, outlier_params, same)

from tpcomp_megatron.codecs import FORMATS, REDUCED, make_codec, parse_codec_spec  # noqa: E402

CASES = [(32, "e8m0", 300, 5120), (16, "bf16", 17, 640), (8, "e8m0", 3, 96), (128, "bf16", 1, 1152),
         (64, "e8m0", 33, 4096), (32, "e8m0up", 300, 5120), (16, "e8m0up", 5, 640), (32, "e6m2", 300, 5120),
         (16, "e6m2", 17, 640), (32, "e6m2d", 300, 5120), (8, "e6m2d", 17, 640)]
SPECS = ["outlier_int4", "outlier+fp4_e2m1/b32", "outlier+int4/b16/bf16/k32", "outlier+fp6_e3m2/b8"]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("element", sorted(FORMATS))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_block_codec_cuda(element, case):
    block, scale, rows, hidden = CASES[case]
    gen = _gen(element, case)
    n = 2 + case % 3
    xs = [hard_input(rows, hidden, block, torch.bfloat16, gen, fmt=element) for _ in range(n)]
    check_all_ops(K, block_codec(element, block, scale), xs, hidden, "cuda", (torch.bfloat16, torch.float32))


@pytest.mark.parametrize("element", sorted(FORMATS))
def test_e6m2_boundaries_cuda(element):
    codec = block_codec(element, 8, "e6m2")
    rows = e6m2_boundary_rows(codec, _gen("e6m2", element))
    assert same(K.encode(codec, rows.cuda(), source=0).cpu(), codec.encode(rows, source=0))


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e8m0", "int4/b32/e8m0", "int8/b16/bf16", "fp6_e2m3/b64/bf16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_input_dtypes_cuda(spec, dtype):
    codec = make_codec(spec)
    gen = _gen(spec, dtype)
    xs = [hard_input(17, 640, codec.spec.block, dtype, gen, fmt=codec.spec.element) for _ in range(2)]
    check_all_ops(K, codec, xs, 640, "cuda", (dtype,))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("rows,hidden", [(17, 640), (300, 5120), (1, 576)])
def test_outlier_codecs_cuda(spec, rows, hidden):
    gen = _gen(spec, rows, hidden)
    params = outlier_params(hidden, 3, parse_codec_spec(spec).ratio, gen)
    codec = make_codec(spec, params)
    for dtype in (torch.bfloat16, torch.float32):
        xs = [outlier_input(rows, params, s, dtype, gen) for s in range(3)]
        check_all_ops(K, codec, xs, hidden, "cuda", (dtype,))


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e8m0", "int4/b32/e8m0", "outlier_int4", "outlier+fp4_e2m1/b32",
                                  "lloyd4/b32/e6m2d"])
def test_large_messages_cuda(spec):
    """Many programs per launch (rows x column tiles), without NaN blocks."""
    gen = _gen("large", spec)
    rows, hidden = 2048, 8192
    params = outlier_params(hidden, 2, 64, gen)
    codec = make_codec(spec, params)
    if codec.spec.__class__.__name__ == "BlockSpec":
        xs = [hard_input(rows, hidden, 32, torch.bfloat16, gen, nonfinite=False) for _ in range(2)]
    else:
        xs = [outlier_input(rows, params, s, torch.bfloat16, gen, nonfinite=False) for s in range(2)]
    check_all_ops(K, codec, xs, hidden, "cuda", (torch.bfloat16,))


def test_int64_indexing_path_cuda(monkeypatch):
    monkeypatch.setattr(K.launch, "INT32_LIMIT", 0)
    gen = _gen("i64")
    params = outlier_params(640, 2, 64, gen)
    for spec in ("fp5_e3m1/b32", "outlier+int4/b32", "outlier_int4"):
        codec = make_codec(spec, params)
        xs = [outlier_input(17, params, s, torch.bfloat16, gen) for s in range(2)]
        check_all_ops(K, codec, xs, 640, "cuda", (torch.bfloat16,))


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e8m0", "int4/b32/e8m0", "outlier_int4", "outlier+fp4_e2m1/b32"])
def test_cuda_graph_capture_and_replay(spec):
    """The four ops captured once, replayed on fresh inputs: same results as the reference."""
    gen = _gen("graph", spec)
    rows, hidden, n = 64, 1024, 2
    params = outlier_params(hidden, n, 64, gen)
    codec = make_codec(spec, params)

    def fresh():
        return [outlier_input(rows, params, s, torch.bfloat16, gen) for s in range(n)]

    x = torch.empty(rows, hidden, dtype=torch.bfloat16, device="cuda")
    peer = torch.empty(rows, codec.row_bytes(hidden), dtype=torch.uint8, device="cuda")

    def step():
        mine = K.encode(codec, x, source=0)
        p = torch.stack([mine, peer])
        return (mine, K.decode_sum(codec, p, hidden, sources=range(n), dtype=torch.bfloat16),
                K.decode_sum_encode(codec, p, hidden, sources=range(n), out_source=REDUCED),
                K.decode_each(codec, p, hidden, sources=range(n), dtype=torch.bfloat16))

    xs = fresh()
    x.copy_(xs[0])
    peer.copy_(codec.encode(xs[1], source=1))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles the kernels and builds the codec's device tables
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        xs = fresh()
        x.copy_(xs[0])
        peer.copy_(codec.encode(xs[1], source=1))
        graph.replay()
        torch.cuda.synchronize()
        p = torch.stack([codec.encode(xs[0], source=0), codec.encode(xs[1], source=1)])
        want = (p[0], codec.decode_sum(p, hidden, range(n), dtype=torch.bfloat16),
                codec.encode(codec.decode_sum_f32(p, hidden, range(n)), source=REDUCED),
                torch.cat([codec.decode(q, hidden, source=s, dtype=torch.bfloat16) for q, s in zip(p, range(n))]))
        for name, got, ref in zip(("encode", "decode_sum", "decode_sum_encode", "decode_each"), outs, want):
            assert same(got, ref), f"{spec} {name} after graph replay"


def test_torch_compile_fullgraph():
    codec = make_codec("fp4_e2m1/b32/e8m0")
    hidden = 1024
    args = K.api._block_args(codec, hidden, torch.device("cuda"))

    def fn(x, peer):
        mine = torch.ops.tpcomp.block_encode(x, *args, codec.row_bytes(hidden))
        p = torch.stack([mine, peer])
        return torch.ops.tpcomp.block_decode(p, hidden, *args, "sum", torch.bfloat16) * 2

    gen = _gen("compile")
    x = hard_input(64, hidden, 32, torch.bfloat16, gen, nonfinite=False).cuda()
    peer = codec.encode(hard_input(64, hidden, 32, torch.bfloat16, gen, nonfinite=False)).cuda()
    compiled = torch.compile(fn, fullgraph=True)
    assert same(compiled(x, peer), fn(x, peer))


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e8m0", "outlier_int4", "outlier+fp4_e2m1/b32"])
def test_ops_dispatch_cuda(spec):
    """`tpcomp_megatron.ops`, what the collectives call, on CUDA tensors: the kernels serve it
    (encode into a caller's buffer, the peer-list decode) with the reference's bytes."""
    from tpcomp_megatron import ops

    gen = _gen("ops", spec)
    rows, hidden, n = 40, 1536, 3
    params = outlier_params(hidden, n, 64, gen)
    codec = make_codec(spec, params)
    xs = [outlier_input(rows, params, s, torch.bfloat16, gen) for s in range(n)]
    want = [codec.encode(x, source=s) for s, x in enumerate(xs)]
    buf = torch.empty(n, rows, codec.row_bytes(hidden), dtype=torch.uint8, device="cuda")
    for s, x in enumerate(xs):
        slot = buf[s]
        assert ops.encode(codec, x.cuda(), source=s, out=slot) is slot
        assert torch.equal(slot.cpu(), want[s])
    ref = codec.decode_sum(torch.stack(want), hidden, range(n), dtype=torch.bfloat16)
    assert same(ops.decode_sum(codec, buf, hidden, sources=range(n), dtype=torch.bfloat16), ref)
    assert same(ops.decode_sum_list(codec, list(buf.unbind(0)), hidden, sources=range(n),
                                    dtype=torch.bfloat16), ref)


@pytest.mark.parametrize("spec", ["lowrank+fp4_e2m1/b32/e6m2/r4", "lowrank+int4/b16/bf16/r8",
                                  "lowrank+lloyd3/b32/e6m2/r128/cfp4_e2m1", "lowrank+lloyd4/b32/e6m2/r64/cfp4_e2m1",
                                  "lowrank+lloyd4/b64/e6m2/r64/cfp4_e2m1", "lowrank+lloyd4/b64/e6m2/r128/cfp4_e2m1",
                                  "lowrank+lloyd4/b32/e6m2d/r64/cfp4_e2m1"])
def test_lowrank_codec_cuda(spec):
    """Encoding and decoding run their matmuls through cuBLAS (coordinates, low-rank parts), which
    sums in another order than the CPU: a coordinate, and then a code, may round the other way (a
    few payload bytes in a thousand), and decoded values may differ in the last bits."""
    hidden, rows, world = 4096, 300, 3
    gen = _gen(spec)
    codec = make_codec(spec, lowrank_bases(hidden, world, parse_codec_spec(spec).rank, gen))
    srcs = [2, 0, REDUCED, 1]
    xs = [lowrank_input(rows, codec.bases, s, torch.bfloat16, gen) for s in srcs]
    got = torch.stack([K.encode(codec, x.cuda(), source=s) for s, x in zip(srcs, xs)]).cpu()
    want = torch.stack([codec.encode(x, source=s) for s, x in zip(srcs, xs)])
    assert (got != want).float().mean() < 3e-3
    pd = want.cuda()
    for dtype in (torch.bfloat16, torch.float32):
        assert close(K.decode_sum(codec, pd, hidden, sources=srcs, dtype=dtype), codec.decode_sum(want, hidden, srcs, dtype=dtype))
        each = torch.cat([codec.decode(q, hidden, source=s, dtype=dtype) for q, s in zip(want, srcs)])
        assert close(K.decode_each(codec, pd, hidden, sources=srcs, dtype=dtype), each)
    # graph capture of encode + decode_sum (the matmuls and the kernels)
    x = xs[0].cuda()
    K.encode(codec, x, source=0)  # warm up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        p = K.encode(codec, x, source=0)
        y = K.decode_sum(codec, p.unsqueeze(0), hidden, sources=[0], dtype=torch.float32)
    x.copy_(xs[1].cuda())
    g.replay()
    assert torch.equal(p, K.encode(codec, x, source=0))
    assert same(y, K.decode_sum(codec, p.unsqueeze(0), hidden, sources=[0], dtype=torch.float32))  # NaN rows too


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """NaN where the reference has NaN; elsewhere within 1e-5 of the row's largest magnitude plus
    one unit in the last place of the output dtype (a last-bit difference in float32 may round a
    bf16 output the other way)."""
    got, want = got.cpu().float(), want.cpu().float()
    if got.shape != want.shape or not torch.equal(torch.isnan(got), torch.isnan(want)):
        return False
    g, w = torch.nan_to_num(got), torch.nan_to_num(want)
    tol = 1e-5 * w.abs().amax(dim=-1, keepdim=True) + 2 ** -7 * w.abs()
    return bool(((g - w).abs() <= tol).all())


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e6m2", "lloyd4/b32/e6m2", "lloyd3/b32/e6m2", "fp6_e2m3/b32/e8m0",
                                  "int4/b16/bf16"])
@pytest.mark.parametrize("rows,hidden", [(300, 5120), (17, 640)])
def test_encode_feedback_cuda(spec, rows, hidden):
    codec = make_codec(spec)
    gen = _gen("feedback", spec, rows)
    for dtype in (torch.bfloat16, torch.float32):
        x = hard_input(rows, hidden, codec.spec.block, dtype, gen, fmt=codec.spec.element)
        check_encode_feedback(K, codec, x, feedback_debt(x, gen), 0, "cuda")


@pytest.mark.parametrize("spec", ["lowrank+fp4_e2m1/b32/e6m2/r4", "lowrank+lloyd4/b32/e6m2/r64/cfp4_e2m1",
                                  "lowrank+lloyd4/b64/e6m2/r64/cfp4_e2m1", "lowrank+lloyd4/b32/e6m2d/r64/cfp4_e2m1"])
def test_lowrank_encode_feedback_cuda(spec):
    """The coordinates are cuBLAS's (see test_lowrank_codec_cuda), so the payload may differ from
    the CPU's in a few bytes; the new debt is exactly the send minus what this payload decodes to."""
    hidden, rows = 4096, 300
    gen = _gen("lowrank-feedback", spec)
    codec = make_codec(spec, lowrank_bases(hidden, 2, parse_codec_spec(spec).rank, gen))
    x = lowrank_input(rows, codec.bases, 1, torch.bfloat16, gen)
    debt = feedback_debt(x, gen)
    got_debt = debt.cuda()
    payload = K.encode_feedback(codec, x.cuda(), got_debt, source=1).cpu()
    send = x.float() + debt
    assert (payload != codec.encode(send, source=1)).float().mean() < 3e-3
    # the debt is the send minus what the payload decodes to, the low-rank part being cuBLAS's
    got_back = send - got_debt.cpu()
    want_back = codec.decode_f32(payload, hidden, source=1)
    assert close(got_back, want_back)
    assert same(got_debt, send - K.decode_each(codec, payload.cuda()[None], hidden, sources=[1], dtype=torch.float32).cpu())


def test_encode_feedback_graph_replay():
    """Captured once, replayed on fresh inputs and debts: the reference's payload and debt."""
    codec = make_codec("fp4_e2m1/b32/e6m2")
    rows, hidden = 64, 1024
    gen = _gen("feedback-graph")
    x = torch.empty(rows, hidden, dtype=torch.bfloat16, device="cuda")
    debt = torch.empty(rows, hidden, dtype=torch.float32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        K.encode_feedback(codec, x.zero_(), debt.zero_(), source=0)  # warm-up: compiles the kernel
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        payload = K.encode_feedback(codec, x, debt, source=0)
    for _ in range(2):
        xs = hard_input(rows, hidden, 32, torch.bfloat16, gen)
        d0 = feedback_debt(xs, gen)
        x.copy_(xs)
        debt.copy_(d0)
        graph.replay()
        torch.cuda.synchronize()
        send = xs.float() + d0
        want = codec.encode(send, source=0)
        assert same(payload, want) and same(debt, send - codec.decode_f32(want, hidden, source=0))


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e6m2", "lloyd4/b32/e6m2d", "int8/b16/bf16", "fp6_e2m3/b32/e8m0up",
                                  "outlier_int4/k32", "outlier+fp4_e2m1/b32/k32", "lowrank+fp4_e2m1/b32/e6m2/r4",
                                  "lowrank+lloyd4/b32/e6m2/r64/cfp4_e2m1"])
def test_eager_plans_match_custom_ops_cuda(spec):
    """The eager path (plans replayed, kernels launched straight through their compiled binary)
    gives the custom ops' bytes; after the first call every launch goes direct."""
    from kernel_cases import check_eager_matches_custom_ops

    gen = _gen("plans", spec)
    hidden, n = 640, 3
    if spec.startswith("lowrank"):
        bases = lowrank_bases(hidden, n, parse_codec_spec(spec).rank, gen)
        codec = make_codec(spec, bases)
        xs = [lowrank_input(40, bases, s, torch.bfloat16, gen, nonfinite=False) for s in range(n)]
    else:
        params = outlier_params(hidden, n, 32, gen)
        codec = make_codec(spec, params)
        xs = [outlier_input(40, params, s, torch.bfloat16, gen, nonfinite=False) for s in range(n)]
    plans = check_eager_matches_custom_ops(K, codec, xs, hidden, "cuda",
                                           feedback=isinstance(codec, K.FEEDBACK_CODECS))
    launches = [launch for plan in plans for launch in plan.launches]
    assert launches and all(launch.compiled is not None for launch in launches), spec


@pytest.mark.parametrize("world", [2, 3, 8])
def test_collectives_through_kits_cuda(world):
    """Collectives through the kits (comm/engine.py: plans per row bucket launched direct for each
    call's rows, payload buffers kept, the stream in the key) give the CPU reference's bytes call
    after call with fresh inputs and row counts that change within a bucket or split unevenly,
    on the default stream and a side stream; a CUDA graph captured around the same calls (buffers
    from the graph's pool) replays those bytes. One GPU, the mirror process group."""
    from graph_cases import every_op as results
    from tpcomp_megatron.comm import CompressedComm, GatePolicy
    from tpcomp_megatron.testing.onerank import mirror_group

    with mirror_group(world):
        gen = _gen("kits", world)
        hidden = 640
        params = outlier_params(hidden, world, 32, gen)
        codecs = [make_codec("fp4_e2m1/b32/e6m2"), make_codec("lloyd4/b32/e6m2d"),
                  make_codec("outlier+fp4_e2m1/b32/k32", params), make_codec("outlier_int4/k32", params),
                  make_codec("lowrank+fp4_e2m1/b32/e6m2/r4", lowrank_bases(hidden, world, 4, gen))]
        policy = GatePolicy(min_bytes=0, link="pcie_class", transport="nccl")
        side = torch.cuda.Stream()
        for codec in codecs:
            # the reference: the codecs' CPU path, bit for bit; low-rank codecs' matmuls round
            # otherwise on cuBLAS (test_lowrank_codec_cuda): buffers allocated per call on the GPU
            on_cpu = not str(codec.spec).startswith("lowrank")
            fast = CompressedComm(policy=policy)
            slow = CompressedComm(policy=policy, keep_buffers=on_cpu)
            device = "cpu" if on_cpu else "cuda"
            for rows in (12 * world, 9 * world, 7, 13, 1, 200):
                x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
                want = [w.cpu() for w in results(slow, codec, x.to(device))]
                for stream in (torch.cuda.current_stream(), side):
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        got = results(fast, codec, x.cuda())
                    torch.cuda.synchronize()
                    assert all(same(a.cpu(), b) for a, b in zip(got, want)), (codec.spec, rows)
            assert fast.kits.built <= 2 * 4 * 5, "a kit per operation, stream and row bucket"
            launches = [launch for kit in fast.kits._kits.values()
                        for fn in (kit.encode, getattr(kit, "decode_sum", None), getattr(kit, "decode_each", None))
                        for launch in getattr(fn, "launches", ())]
            assert launches and all(launch.compiled is not None for launch in launches), codec.spec
            static = torch.randn(5 * world + 1, hidden, generator=gen).to(torch.bfloat16)
            want = [w.cpu() for w in results(slow, codec, static.to(device))]
            static = static.cuda()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                results(fast, codec, static)  # warm-up off the default stream, as capture wants
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = results(fast, codec, static)
            graph.replay()
            torch.cuda.synchronize()
            assert all(same(a.cpu(), b) for a, b in zip(outs, want)), codec.spec


@pytest.mark.parametrize("world", [2, 8])
def test_collectives_replayed_from_graphs_cuda(world):
    """Eager collectives replayed from CUDA graphs of their padded row count (comm/graphs.py: the
    first call of a graph row count runs on the padded input, the second captures, later ones
    replay) give the bytes of the same calls launched step by step, on fresh inputs each call,
    with row counts that split unevenly and that share a graph (297 and 300 rows: 304), written
    into the caller's tensor where the all-reduce may (in place). Growing a collective's static
    buffers drops its graphs; at most `max_graphs` are kept; buffers over the budget leave the
    call stepped; under an outer capture the collectives are captured as before. One GPU, the
    mirror group (so the two-shot is compared with the stepped call of the same padded rows)."""
    from tpcomp_megatron.comm import CompressedComm, GatePolicy
    from tpcomp_megatron.comm.graphs import padded_rows
    from tpcomp_megatron.testing.onerank import mirror_group

    def results(comm, codec, x):
        out = [comm.all_reduce(x.clone(), codec, algorithm="one_shot"), comm.all_gather(x, codec)]
        if comm is not stepped:
            out.append(comm.all_reduce(x.clone(), codec, algorithm="two_shot", in_place=True))
        else:  # the mirror group's two-shot output depends on where the chunks split: the padded rows'
            rows = padded_rows("two_shot", x.shape[0], world, True)
            padded = torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])
            out.append(comm.all_reduce(padded, codec, algorithm="two_shot")[:x.shape[0]])
        if x.shape[0] % world == 0:
            out.append(comm.reduce_scatter(x, codec))
        return out

    with mirror_group(world):
        gen = _gen("graphs", world)
        hidden = 640
        params = outlier_params(hidden, world, 32, gen)
        policy = GatePolicy(min_bytes=0, link="pcie_class", transport="nccl")
        stepped = CompressedComm(policy=policy, cuda_graphs=False)
        assert stepped.graphs is None
        for codec in (make_codec("fp4_e2m1/b32/e6m2"), make_codec("outlier+fp4_e2m1/b32/k32", params)):
            graphed = CompressedComm(policy=policy)
            for rows in (8 * world, 7, 8 * world, 13, 7, 300, 297, 300, 297):
                for _ in range(3):
                    x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16).cuda()
                    got, want = results(graphed, codec, x), results(stepped, codec, x)
                    torch.cuda.synchronize()
                    assert all(same(a.cpu(), b.cpu()) for a, b in zip(got, want)), (codec.spec, rows)
                if rows == 300:
                    captured = graphed.graphs.captured
            assert graphed.graphs.captured == captured, "297 rows replay the graphs of 300 (both 304)"
            assert graphed.graphs.replays > graphed.graphs.captured >= 4 * 3
            assert graphed.graphs.nbytes == sum(s.nbytes for s in graphed.graphs._statics.values())
            assert graphed.graphs.nbytes <= graphed.graphs.budget
        small = CompressedComm(policy=policy)
        small.graphs.max_graphs = 1  # each capture drops the other graph
        for rows in (4 * world, 2 * world, 4 * world, 2 * world):
            for _ in range(3):
                x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16).cuda()
                assert same(small.all_reduce(x, codec).cpu(), stepped.all_reduce(x, codec).cpu()), rows
        assert small.graphs.captured == 4 and len(small.graphs._graphs) == 1
        grow = CompressedComm(policy=policy)
        for rows in (2 * world, 2 * world, 8 * world, 8 * world):  # the second size grows the static buffers
            x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16).cuda()
            assert same(grow.all_reduce(x, codec).cpu(), stepped.all_reduce(x, codec).cpu()), rows
        assert grow.graphs.captured == 2 and len(grow.graphs._graphs) == 1, "the growth dropped the first graph"
        tight = CompressedComm(policy=policy)
        tight.graphs.budget = 2 * hidden * 2 * world - 1  # not even 2 * world rows' input and output
        for _ in range(3):
            x = torch.randn(2 * world, hidden, generator=gen).to(torch.bfloat16).cuda()
            assert same(tight.all_reduce(x, codec).cpu(), stepped.all_reduce(x, codec).cpu())
        assert tight.graphs.captured == 0 and tight.graphs.nbytes == 0
        warm = CompressedComm(policy=policy)  # start-up capture: later lengths capture nothing
        count = warm.capture_graphs("all_reduce", codec, hidden, torch.bfloat16, torch.device("cuda"), 200)
        assert count == warm.graphs.captured > 0
        # one-shot at 2 ranks; at 8, two-shot under the mirror group: the same chunks padded or not
        for rows in (199, 150, 37, 3, 77):
            x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16).cuda()
            assert same(warm.all_reduce(x, codec).cpu(), stepped.all_reduce(x, codec).cpu()), rows
        assert warm.graphs.captured == count and warm.stats.calls_compressed == 5
        static = torch.randn(5 * world, hidden, generator=gen).to(torch.bfloat16).cuda()
        want = [w.cpu() for w in results(stepped, codec, static)]
        graphed = CompressedComm(policy=policy)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            results(graphed, codec, static)  # warm-up off the default stream, as capture wants
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = results(graphed, codec, static)
        graph.replay()
        torch.cuda.synchronize()
        assert all(same(a.cpu(), b) for a, b in zip(outs, want))


@pytest.mark.parametrize("spec", ["fp4_e2m1/b32/e6m2", "lloyd4/b32/e6m2d", "outlier+fp4_e2m1/b32/k32"])
def test_decode_sum_list_cuda(spec):
    """Separate CUDA buffers (as peers' symmetric-memory slots) are read where they lie: the
    same bytes as stacking them, launched straight through the compiled binary after the first
    call, the source table built once per address set."""
    gen = _gen("list", spec)
    hidden, n = 640, 3
    params = outlier_params(hidden, n, 32, gen)
    codec = make_codec(spec, params)
    for call in range(3):
        xs = [outlier_input(40, params, s, torch.bfloat16, gen, nonfinite=False).cuda() for s in range(n)]
        payloads = [K.encode(codec, x, source=s) for s, x in enumerate(xs)]
        order = [2, 0, 1] if call == 1 else [0, 1, 2]
        listed = [payloads[i] for i in order]
        want = K.decode_sum(codec, torch.stack(listed), hidden, sources=order, dtype=torch.bfloat16)
        got = K.decode_sum_list(codec, listed, hidden, sources=order, dtype=torch.bfloat16)
        assert same(got.cpu(), want.cpu()), (spec, call)
