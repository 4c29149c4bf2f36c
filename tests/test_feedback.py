"""Error feedback (comm/feedback.py) on real gloo ranks: the errors telescope, and the ranks
agree with the one-process simulation bit for bit."""

import pytest
import torch
import torch.distributed as dist

from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.comm import CompressedComm, GatePolicy
from tpcomp_megatron.comm.feedback import ErrorFeedback, PostNorm, feedback_cost
from tpcomp_megatron.comm.gate import ineligible
from tpcomp_megatron.quality.simtp import simulated_all_reduce
from tpcomp_megatron.testing import run_ranks

HIDDEN = 96
STEPS = 6


def _partials(world, seed, rows):
    """Fresh partial sums of one reduction for every rank (float32: the identity below is exact
    up to float32 rounding), with an outlier channel like row-parallel partial sums have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world, rows, HIDDEN, generator=g) * torch.rand(world, rows, 1, generator=g).add(0.2)
    x[..., 5] *= 20
    return x


def _chain(rank, world, seed, spec, algos):
    """Run STEPS reductions through one communicator; return (outputs, final debt) of this rank.
    `algos[i]`: 'one_shot', 'two_shot', 'reduce_scatter' or 'exact' (the gate's fallback)."""
    codec = make_codec(spec)
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    gated = CompressedComm(policy=GatePolicy(min_bytes=1 << 40, link="cpu"))  # sends everything exactly
    state = ErrorFeedback(world)
    outs = []
    for i, algo in enumerate(algos):
        p = _partials(world, seed + i, 2 * world + 1 if algo != "reduce_scatter" else 2 * world)[rank]
        if algo == "reduce_scatter":
            shard = comm.reduce_scatter(p, codec, feedback=state)
            full = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(full, shard)
            outs.append(torch.cat(full))
        elif algo == "exact":
            outs.append(gated.all_reduce(p, codec, feedback=state))
        else:
            outs.append(comm.all_reduce(p, codec, algorithm=algo, feedback=state))
    return outs, state.debt


CHAINS = {
    "one_shot": ["one_shot"] * STEPS,
    "two_shot": ["two_shot"] * STEPS,
    "mixed": ["one_shot", "exact", "two_shot", "one_shot", "exact", "one_shot"],
    "reduce_scatter": ["reduce_scatter"] * STEPS,
}


def _check_chains(rank, world, seed, spec):
    return {name: _check_chain(rank, world, seed, spec, name) for name in CHAINS}


def _check_chain(rank, world, seed, spec, name):
    algos = CHAINS[name]
    outs, debt = _chain(rank, world, seed, spec, algos)
    debts = [torch.empty_like(debt) for _ in range(world)]
    dist.all_gather(debts, debt)
    exact_total, got_total, plain_err = 0, 0, 0
    codec = make_codec(spec)
    for i, (algo, out) in enumerate(zip(algos, outs)):
        parts = _partials(world, seed + i, out.shape[0])
        exact = parts.sum(0)
        exact_total = exact_total + exact
        got_total = got_total + out
        if algo != "exact":  # what the same step costs without feedback (same algorithm and codec;
            # a reduce-scatter rounds as one-shot does: rows are coded independently)
            plain = simulated_all_reduce(codec, parts, algorithm="two_shot" if algo == "two_shot" else "one_shot")
            plain_err = plain_err + (plain - exact)
    # The identity: everything sent so far arrived, except what the ranks still owe.
    owed = torch.stack(debts).sum(0)
    assert torch.allclose(got_total, exact_total - owed, rtol=0, atol=1e-4 * float(exact_total.abs().max())), name
    return float((got_total - exact_total).norm() / plain_err.norm())


@pytest.mark.parametrize("world", [2, 3])
def test_errors_telescope_on_ranks(world):
    seed = int(torch.randint(0, 1 << 20, ()))
    per_rank = run_ranks(_check_chains, world, seed, "fp4_e2m1/b32/e6m2")
    for name in CHAINS:
        ratios = [r[name] for r in per_rank]
        # Without feedback the final error is the sum of STEPS errors; with it, about one error.
        assert max(ratios) < 0.75, (name, ratios, seed)


def _check_sim_agrees(rank, world, seed, spec):
    for algo in ("one_shot", "two_shot"):
        outs, _ = _chain(rank, world, seed, spec, [algo] * STEPS)
        fbs = [ErrorFeedback(world) for _ in range(world)]
        codec = make_codec(spec)
        for i, out in enumerate(outs):
            parts = _partials(world, seed + i, out.shape[0])
            sim = simulated_all_reduce(codec, parts, algorithm=algo, feedback=fbs)
            assert torch.equal(sim, out), f"step {i}: real ranks and simulation differ ({algo})"
    return True


def test_real_ranks_equal_simulation():
    seed = int(torch.randint(0, 1 << 20, ()))
    assert run_ranks(_check_sim_agrees, 3, seed, "int4/b16/bf16") == [True] * 3


def test_debt_of_other_rows_is_dropped_not_mixed():
    fb = ErrorFeedback(2)
    x = torch.randint(-64, 64, (4, HIDDEN)) / 8.0  # eighths: every sum below is exact in float32
    fb.settle(fb.to_send(x), x + 1)
    assert torch.equal(fb.to_send(x), x - 1)
    y = torch.randn(5, HIDDEN)
    assert torch.equal(fb.to_send(y), y) and fb.dropped == 1 and fb.debt is None


def test_gate_asks_feedback_to_pay_for_its_work():
    """Feedback's extra kernel work raises the size threshold by its measured cost: the fused
    pre-norm encode in one-shot least, in two-shot more, a post-norm's steps most; over NVLink it
    never pays."""
    codec = make_codec("fp4_e2m1/b32/e6m2")
    gate = GatePolicy(link="pcie_class")
    plain = gate.threshold(2, codec, HIDDEN)
    costs = [feedback_cost(None, "one_shot"), feedback_cost(None, "two_shot"),
             feedback_cost(PostNorm.probe(torch.nn.RMSNorm(HIDDEN), HIDDEN), "one_shot")]
    assert 1.0 < costs[0] < costs[1] < costs[2]
    for c in costs:
        assert abs(gate.threshold(2, codec, HIDDEN, c) - plain * c) <= c
    rows = (plain // 2) // HIDDEN + 1  # just above the plain threshold, below the fused one
    x = torch.randn(rows, HIDDEN, dtype=torch.bfloat16)
    assert ineligible(x, codec, 2, gate) is None
    assert ineligible(x, codec, 2, gate, extra_cost=costs[0]) == "below size threshold"
    assert GatePolicy(link="nvlink").threshold(2, codec, HIDDEN, costs[0]) >= 1 << 62
    assert GatePolicy(link="nvlink", min_bytes=0).threshold(2, codec, HIDDEN, costs[2]) == 0
