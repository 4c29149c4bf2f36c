"""The padded calls CUDA graphs are kept for (comm/graphs.py): graph row counts, and a padded
call's rows equal the unpadded call's bit for bit on real gloo ranks (each rank's padding rows
its own garbage), for every codec kind and operation. The capture and replay themselves run on
CUDA only (tests/gpu/test_kernels_cuda.py::test_collectives_replayed_from_graphs_cuda)."""

import pytest
import torch

from graph_cases import OPS, call, padded_call
from tpcomp_megatron.comm import CompressedComm, GatePolicy
from tpcomp_megatron.comm.graphs import EXACT_ROWS, GRAPH_STEPS, graph_rows, padded_rows
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
    """A reduce-scatter pads each rank's chunk (so each rank keeps its own rows); a codec whose
    rows are not padded exactly keeps its row count."""
    for m in (1, 31, 33, 97, 1000, 4099):
        assert padded_rows("one_shot", m, n, True) == padded_rows("two_shot", m, n, True) == graph_rows(m)
        assert padded_rows("all_gather", m, n, False) == m
        assert padded_rows("reduce_scatter", m * n, n, True) == n * graph_rows(m)


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
                if not (got.shape == want.reshape(got.shape).shape and torch.equal(got.view(torch.int16),
                                                                                   want.reshape(got.shape).view(torch.int16))):
                    bad.append((spec, m, op))
    return bad


@pytest.mark.parametrize("world", [2, 3])
def test_padded_calls_equal_unpadded_on_gloo_ranks(world):
    assert run_ranks(_check_padded, world) == [[]] * world
