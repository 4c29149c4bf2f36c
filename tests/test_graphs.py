"""The padded calls CUDA graphs are kept for (comm/graphs.py): graph row counts, and a padded
call's rows equal the unpadded call's bit for bit on real gloo ranks (each rank's padding rows
its own garbage), for every codec kind and operation. The capture and replay themselves run on
CUDA only (tests/gpu/test_kernels_cuda.py::test_collectives_replayed_from_graphs_cuda)."""

import pytest
import torch

from graph_cases import OPS, call, padded_call
from tpcomp_megatron.comm import CompressedComm, GatePolicy
from tpcomp_megatron.comm.graphs import EXACT_ROWS, GRAPH_STEPS, graph_row_counts, graph_rows, padded_rows
from tpcomp_megatron.testing import run_ranks
from test_collectives import _codec, _inputs


def test_graph_rows_pad_at_most_one_step_per_octave():
    """Exact up to EXACT_ROWS; above, never fewer rows, at most 1/GRAPH_STEPS more, monotone, and
    GRAPH_STEPS graph row counts per octave (so 1000 prompt lengths need a few dozen graphs)."""
    got = [graph_rows(m) for m in range(1, 20000)]
    assert got[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))
    for m, g in enumerate(got, start=1):
        assert m <= g <= m + m // GRAPH_STEPS, (m, g)
    assert all(a <= b for a, b in zip(got, got[1:]))
    for k in range(6, 14):  # the octave (2^(k-1), 2^k]
        assert len({graph_rows(m) for m in range((1 << (k - 1)) + 1, (1 << k) + 1)}) == GRAPH_STEPS
    assert graph_rows(graph_rows(1234)) == graph_rows(1234)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_padded_rows_per_operation(n):
    """A reduce-scatter pads each rank's chunk (so each rank keeps its own rows), a two-shot to
    equal chunks; a codec whose rows are not padded exactly keeps its row count."""
    for m in (1, 31, 33, 97, 1000, 4099):
        assert padded_rows("one_shot", m, n, True) == padded_rows("all_gather", m, n, True) == graph_rows(m)
        two = padded_rows("two_shot", m, n, True)
        assert two % n == 0 and graph_rows(m) <= two < graph_rows(m) + n
        assert padded_rows("all_gather", m, n, False) == m
        assert padded_rows("reduce_scatter", m * n, n, True) == n * graph_rows(m)


def _same(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


SPECS = ["fp4_e2m1/b32/e8m0", "int4/b16/bf16", "outlier_int4/k32", "outlier+fp5_e2m2/b32", "lloyd4/b32/e6m2d",
         "lowrank+fp4_e2m1/b32/e6m2/r2"]


def _check_padded(rank, world):
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    bad = []
    for i, spec in enumerate(SPECS):
        h = 128 if "e6m2d" in spec else 64
        codec = _codec(spec, world, i, (4, 16, h))
        assert codec.pads_rows_exactly == (not spec.startswith("lowrank"))
        gen = torch.Generator().manual_seed(1000 * i + rank)
        fill = (torch.randn(4096, h, generator=gen) * 1e3).to(torch.bfloat16)  # this rank's own garbage
        for m in (37, 70, 133, 255):
            x = _inputs(rank, 10 * i + m, (m * world, h))
            for op in OPS:
                rows = x if op == "reduce_scatter" else x[:m]
                want = call(comm, op, codec, rows)
                got = padded_call(comm, op, codec, rows, fill)
                if not _same(got, want.reshape(got.shape)):
                    bad.append((spec, m, op))
    return bad


@pytest.mark.parametrize("world", [2, 3])
def test_padded_calls_equal_unpadded_on_gloo_ranks(world):
    assert run_ranks(_check_padded, world) == [[]] * world


def _graphed_comm(policy, **kw):
    from graph_cases import EagerReplay
    from tpcomp_megatron.comm.graphs import Graphs

    comm = CompressedComm(policy=policy)
    comm.graphs = Graphs(comm.world_size, capture=EagerReplay(), **kw)
    return comm


def _check_replayed(rank, world):
    """Graphed calls (replayed eagerly) against stepped ones, every operation, fresh inputs."""
    policy = GatePolicy(min_bytes=0, link="cpu")
    stepped = CompressedComm(policy=policy, cuda_graphs=False)
    errors = []
    for i, spec in enumerate(["fp4_e2m1/b32/e6m2", "outlier+fp5_e2m2/b32", "lowrank+fp4_e2m1/b32/e6m2/r2"]):
        codec = _codec(spec, world, i, (4, 16, 64))
        graphed = _graphed_comm(policy)
        gen = torch.Generator().manual_seed(rank + 10 * i)
        captured = None
        for rows in (16, 7, 16, 13, 7, 300, 297, 300, 297):
            for _ in range(3):
                x = (torch.randn(rows * world, 64, generator=gen) * 10).to(torch.bfloat16)
                for op in OPS:
                    r = x if op == "reduce_scatter" else x[:rows]
                    want = call(stepped, op, codec, r)
                    mine = r.clone()
                    if op in ("one_shot", "two_shot"):
                        got = graphed.all_reduce(mine, codec, algorithm=op, in_place=True)
                    else:
                        got = call(graphed, op, codec, r)
                    if not _same(got, want):
                        errors.append((spec, rows, op))
                    if op == "two_shot" and got.data_ptr() != mine.data_ptr():
                        errors.append((spec, rows, "replayed in-place all-reduce not into the caller's tensor"))
            if rows == 300 and captured is None:
                captured = graphed.graphs.captured
        g = graphed.graphs
        pads = codec.pads_rows_exactly
        if pads and g.captured != captured:
            errors.append((spec, "297 rows did not replay the graphs of 300 (both 304)"))
        if not pads and g.captured == captured:
            errors.append((spec, "a codec that does not pad shares graphs across row counts"))
        if g.nbytes != sum(s.nbytes for s in g._statics.values()) or g.capture.live != len(g._graphs):
            errors.append((spec, "bookkeeping", g.nbytes, g.capture.live, len(g._graphs)))
        if not g.replays > g.captured >= 3 * 4:
            errors.append((spec, "replays", g.replays, g.captured))
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_replayed_calls_equal_stepped_on_gloo_ranks(world):
    """Through `Graphs.run` (first sight eagerly on the padded input, then capture, then replays,
    the capture replayed eagerly on the CPU): the same bytes as the stepped calls for every
    operation, a row count sharing the graph of a nearby one, the all-reduce written into the
    caller's tensor; a codec that does not pad (low-rank) gets graphs per row count."""
    assert run_ranks(_check_replayed, world) == [[]] * world


def test_graph_memory_bounded_under_1000_lengths():
    """1000 distinct prompt lengths (one process, mirror group of 8): the static buffers stay
    within the budget, at most `max_graphs` graphs live, a collective's growth and the budget drop
    graphs (never all at once but by collective), and graphs are per graph row count, not per
    length; every result equals the stepped call."""
    from tpcomp_megatron.testing.onerank import mirror_group

    with mirror_group(8):
        policy = GatePolicy(min_bytes=0, link="cpu")
        codec = _codec("fp4_e2m1/b32/e6m2", 8, 0, (4, 16, 32))
        budget = 3 * 32 * 2 * 1024  # two collectives of ~1024 rows in and out cannot both fit
        graphed, stepped = _graphed_comm(policy, budget=budget, max_graphs=64), CompressedComm(policy=policy)
        gen = torch.Generator().manual_seed(7)
        lengths = torch.randperm(1100, generator=gen)[:1000] + 1
        for i, m in enumerate(lengths.tolist()):
            x = torch.randn(m, 32, generator=gen).to(torch.bfloat16)
            for op in ("one_shot", "all_gather"):
                got = call(graphed, op, codec, x)
                assert i % 5 or _same(got, call(stepped, op, codec, x)), (m, op)
            g = graphed.graphs
            assert g.nbytes <= budget and len(g._graphs) <= 64 and g.capture.live == len(g._graphs)
        distinct = len({graph_rows(m) for m in lengths.tolist()})
        assert distinct < 250 and g.captured > 0 and g.replays > 0
        assert g.captured + g.replays + len(g._seen) <= 2 * 1000


def test_start_up_capture_serves_every_later_prompt_length():
    """`CompressionHandle.capture_graphs(max_tokens)` on a tiny Megatron model at TP=2 (one rank,
    mirror group; graphs replayed eagerly on the CPU): one graph per graph row count up to
    max_tokens, and afterwards forwards at lengths never seen capture nothing, replay every
    collective and give the stepped model's logits bit for bit; the counters are untouched."""
    from graph_cases import EagerReplay
    from test_onerank import _tiny_cfg
    from tpcomp_megatron.comm.graphs import Graphs, graph_row_counts
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.models.core.builder import build_gpt_model
    from tpcomp_megatron.testing.onerank import one_rank_tp

    gen = torch.Generator().manual_seed(3)
    lengths = [37, 50, 5, 61, 33, 17, 64]
    prompts = [(torch.randint(0, 512, (1, n), generator=gen), torch.arange(n).unsqueeze(0)) for n in lengths]
    with one_rank_tp(2, backend="mirror"), torch.no_grad():
        torch.manual_seed(0)
        model = build_gpt_model(_tiny_cfg(2), use_cpu_initialization=True).eval()
        stepped = apply_tp_compression(model, CompressionConfig(spec="fp4_e2m1/b32/e6m2", min_bytes=0,
                                                                cuda_graphs=False))
        want = [model(t, p, attention_mask=None) for t, p in prompts]
        stepped.remove()
        handle = apply_tp_compression(model, CompressionConfig(spec="fp4_e2m1/b32/e6m2", min_bytes=0))
        assert handle.capture_graphs(64) == 0, "no CUDA graphs on the CPU"
        handle.comm.graphs = graphs = Graphs(2, capture=EagerReplay())
        count = len(graph_row_counts("one_shot", 64, 2))  # one-shot: the all-reduce at 2 ranks
        assert handle.capture_graphs(64) == count == graphs.captured == len(graphs._graphs)
        assert handle.stats.calls_compressed == 0
        replays = graphs.replays
        for (t, p), w in zip(prompts, want):
            assert torch.equal(model(t, p, attention_mask=None), w)
        assert graphs.captured == count, "a length never seen captured a graph"
        assert graphs.replays - replays == 2 * 2 * len(lengths) == handle.stats.calls_compressed
        handle.remove()


def test_capture_graphs_for_every_operation():
    """`CompressedComm.capture_graphs` for the all-reduce, the reduce-scatter (rows per rank's
    chunk) and the all-gather (mirror group of 4, graphs replayed eagerly): later calls of any
    length up to the maximum capture nothing and equal the stepped calls; an unknown operation is
    refused by name."""
    from tpcomp_megatron.testing.onerank import mirror_group

    with mirror_group(4):
        policy = GatePolicy(min_bytes=0, link="cpu")
        codec = _codec("fp4_e2m1/b32/e6m2", 4, 0, (4, 16, 32))
        graphed, stepped = _graphed_comm(policy), CompressedComm(policy=policy)
        with pytest.raises(ValueError, match="unknown collective 'all_to_all'.*all_gather"):
            graphed.capture_graphs("all_to_all", codec, 32, torch.bfloat16, torch.device("cpu"), 64)
        counts = {"two_shot" if op == "all_reduce" else op:  # two-shot: the all-reduce at 4 ranks
                  graphed.capture_graphs(op, codec, 32, torch.bfloat16, torch.device("cpu"), 96)
                  for op in ("all_reduce", "reduce_scatter", "all_gather")}
        assert counts == {op: len(graph_row_counts(op, 96, 4)) for op in ("two_shot", "reduce_scatter", "all_gather")}
        assert graphed.graphs.captured == sum(counts.values()) == len(graphed.graphs._graphs)
        assert graphed.stats.calls_compressed == 0
        captured, gen = graphed.graphs.captured, torch.Generator().manual_seed(5)
        for m in (96, 71, 40, 9, 1):
            x = torch.randn(4 * m, 32, generator=gen).to(torch.bfloat16)
            for op in ("two_shot", "reduce_scatter", "all_gather"):
                r = x[:4 * min(m, 24)] if op == "reduce_scatter" else x[:m]
                assert _same(call(graphed, op, codec, r), call(stepped, op, codec, r)), (m, op)
        assert graphed.graphs.captured == captured
