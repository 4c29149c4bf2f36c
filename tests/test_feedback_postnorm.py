"""Error feedback through post-norms (Gemma 2/3, comm/feedback.py `PostNorm`) on real gloo ranks.

Each reduction's output S passes an RMSNorm before the residual add, so there is no exact
telescoping identity; what holds to first order is: the residual stream's error equals minus the
ranks' debts (kept in residual units). The tests check that identity, that feedback shrinks the
residual error against the same reductions without it, and that real ranks equal the simulation.
"""

import pytest
import torch
import torch.distributed as dist

from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.comm import CompressedComm, GatePolicy
from tpcomp_megatron.comm.feedback import ErrorFeedback, PostNorm
from tpcomp_megatron.models.gemma.layers import ZeroCenteredRMSNorm
from tpcomp_megatron.models.core.norm import RMSNorm
from tpcomp_megatron.quality.simtp import exact_sum, simulated_all_reduce
from tpcomp_megatron.testing import run_ranks

HIDDEN = 96
STEPS = 6


def _partials(world, seed, rows):
    """Fresh partial sums: rows of different scales and one larger channel, like TP partial sums."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world, rows, HIDDEN, generator=g) * torch.rand(1, rows, 1, generator=g).add(0.2)
    x[..., 5] *= 5
    return x


def _norms(seed):
    """Gemma-style post-norms (gain 1 + w) of STEPS reductions: one log-normal gain profile shared
    by all of them, perturbed per reduction as trained models' consecutive norms are (Gemma 3
    270M: correlation of log-gains 0.8-0.9), and one channel whose gain is exactly zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(HIDDEN, generator=g)
    norms = []
    for _ in range(STEPS):
        norm = ZeroCenteredRMSNorm(None, HIDDEN)
        with torch.no_grad():
            norm.weight.copy_((base + 0.3 * torch.randn(HIDDEN, generator=g)).exp() * 3 - 1)
            norm.weight[7] = -1.0
        norms.append(norm)
    return norms


def _residual_error(world, seed, spec, algo, outs):
    """The residual stream's error after the chain whose outputs were `outs`."""
    err = 0
    with torch.no_grad():
        for i, (norm, out) in enumerate(zip(_norms(seed), outs)):
            err = err + norm(out) - norm(exact_sum(_partials(world, seed + i, out.shape[0])))
    return err


def _chain(rank, world, seed, spec, algo, feedback: bool):
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    codec = make_codec(spec)
    state = ErrorFeedback(world) if feedback else None
    outs = []
    for i, norm in enumerate(_norms(seed)):
        p = _partials(world, seed + i, 2 * world + 1)[rank]
        outs.append(comm.all_reduce(p, codec, algorithm=algo, feedback=state, norm=PostNorm.probe(norm, HIDDEN)))
    return outs, state


def _rank_job(rank, world, seed):
    """(identity error / residual error for FP8, feedback / no-feedback error ratios for FP4); also
    checks the ranks against the simulation bit for bit."""
    fp8, fp4 = "fp8_e4m3/b32/e8m0", "fp4_e2m1/b32/e6m2"
    outs, state = _chain(rank, world, seed, fp8, "one_shot", True)
    debts = [torch.empty_like(state.debt) for _ in range(world)]
    dist.all_gather(debts, state.debt)
    err = _residual_error(world, seed, fp8, "one_shot", outs)
    identity = float((err + torch.stack(debts).sum(0)).norm() / err.norm())
    ratios = []
    for algo in ("one_shot", "two_shot"):
        with_fb, _ = _chain(rank, world, seed, fp4, algo, True)
        without, _ = _chain(rank, world, seed, fp4, algo, False)
        ratios.append(float(_residual_error(world, seed, fp4, algo, with_fb).norm()
                            / _residual_error(world, seed, fp4, algo, without).norm()))
        sims = [ErrorFeedback(world) for _ in range(world)]
        for i, (norm, out) in enumerate(zip(_norms(seed), with_fb)):
            parts = _partials(world, seed + i, out.shape[0])
            sim = simulated_all_reduce(make_codec(fp4), parts, algorithm=algo, feedback=sims,
                                       norm=PostNorm.probe(norm, HIDDEN))
            assert torch.equal(sim, out), f"step {i}: real ranks and simulation differ ({algo})"
    return identity, ratios


@pytest.mark.parametrize("world", [2, 3])
def test_post_norm_feedback_on_ranks(world):
    seed = int(torch.randint(0, 1 << 20, ()))
    results = run_ranks(_rank_job, world, seed)
    assert len({r[0] for r in results}) == 1, "ranks disagree on the residual error"
    identity, ratios = results[0]
    # First order: the residual error is minus the summed debts. Measured (2 ranks, 20 seeds):
    # 0.085 mean, 0.11 max; leaving out the norm's projection term gives 0.6.
    assert identity < 0.2, (identity, seed)
    # Without feedback the error is the sum of STEPS errors. Measured mean ratio 0.47 (max 0.72 of
    # 60 chains); not dividing the send by the next norm's gain gives 0.9.
    assert sum(ratios) / len(ratios) < 0.7, (ratios, seed)


def test_probe_reads_the_effective_gain():
    w = torch.randn(HIDDEN)
    gemma, llama = ZeroCenteredRMSNorm(None, HIDDEN), RMSNorm(None, HIDDEN)
    with torch.no_grad():
        gemma.weight.copy_(w)
        llama.weight.copy_(w)
    for norm, want in ((gemma, 1 + w), (llama, w)):
        got = PostNorm.probe(norm, HIDDEN)
        assert torch.allclose(got.gain, want, rtol=1e-6, atol=1e-6) and got.eps == norm.eps
        usable = want.abs() > 1e-3 * want.abs().median()
        assert torch.equal(got.inv_gain == 0, ~usable)
    with pytest.raises(ValueError, match="not an RMSNorm over 48"):
        PostNorm.probe(gemma, 48)


def _reduce_scatter_job(rank, world):
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    norm = PostNorm.probe(RMSNorm(None, HIDDEN), HIDDEN)
    with pytest.raises(ValueError, match="post-norm needs every output row"):
        comm.reduce_scatter(torch.randn(4, HIDDEN), make_codec("fp4_e2m1/b32/e8m0"), feedback=ErrorFeedback(world),
                            norm=norm)
    return True


def test_post_norm_feedback_refuses_reduce_scatter_and_unpaired_settle():
    assert run_ranks(_reduce_scatter_job, 2) == [True, True]
    norm = PostNorm.probe(RMSNorm(None, HIDDEN), HIDDEN)
    fb = ErrorFeedback(2)
    with pytest.raises(RuntimeError, match="without a to_send"):
        fb.settle(torch.zeros(2, HIDDEN), torch.zeros(2, HIDDEN))
    x = torch.randn(2, HIDDEN)
    sent = fb.to_send(x, norm)
    with pytest.raises(ValueError, match="needs its output rows"):
        fb.settle(sent, sent)
