"""The collective engine under serving traffic (comm/engine.py): real depth, a new prompt length on
nearly every request, lengths that do not split over the ranks.

One TP rank of a Megatron GPTModel runs through the mirror process group (its peers hold what it
holds). What is set up (kits: kernel plans and payload buffers) must be built once per (operation,
codec value, row bucket), not per layer or per prompt length; kept bytes stay within the budget
whatever the lengths; codecs of equal value share, codecs of other calibration data do not. That
the engine's results are the reference codecs' bit for bit is tested on real gloo ranks
(test_collectives.py, uneven two-shot rows included) and through the kernels (test_kernel_plans.py).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from tpcomp_megatron.calibration import OutlierParams, select_outlier_channels
from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.comm import CompressedComm, GatePolicy
from tpcomp_megatron.comm.engine import BUDGET_BYTES
from tpcomp_megatron.testing import run_ranks


@pytest.fixture
def mirror():
    from tpcomp_megatron.testing.onerank import register_mirror_backend

    def start(world: int) -> None:
        register_mirror_backend()
        dist.init_process_group("mirror", store=dist.HashStore(), rank=0, world_size=world)
    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def test_deep_model_with_new_prompt_lengths_sets_up_per_bucket_not_per_layer():
    """80 layers at TP=8 (two-shot), a new prompt length per forward (64, 65, 67: the last two
    split unevenly over 8 ranks): every collective is compressed, kits are built once per row
    bucket (64, then 128) and shared by all 160 collectives of a forward, gate answers once per
    length, and a repeated length builds nothing."""
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.models.core.builder import build_gpt_model
    from tpcomp_megatron.models.core.config import LlamaModelConfig
    from tpcomp_megatron.testing.onerank import one_rank_tp

    tp, layers = 8, 80
    cfg = LlamaModelConfig(num_layers=layers, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                           num_kv_heads=8, head_dim=8, vocab_size=64, max_position_embeddings=128,
                           tensor_parallel_size=tp, params_dtype="float32")
    with one_rank_tp(tp, backend="mirror"), torch.no_grad():
        torch.manual_seed(0)
        model = build_gpt_model(cfg, use_cpu_initialization=True).eval()
        handle = apply_tp_compression(model, CompressionConfig(spec="fp4", min_bytes=0, algorithm="two_shot"))
        comm = handle.comm
        codecs = {id(m.tp_compression.codec) for m in model.modules() if getattr(m, "tp_compression", None)}
        assert len(codecs) == 1, "every layer holds the one codec object of its value"
        built, answers = [], []
        for length in (64, 65, 67, 67):
            tokens = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(length))
            handle.stats.reset()
            model(tokens, torch.arange(length).unsqueeze(0), attention_mask=None)
            assert handle.stats.calls_compressed == 2 * layers and handle.stats.calls_fallback == 0, length
            built.append(comm.kits.built)
            answers.append(len(comm._gate))
        assert built == [1, 2, 2, 2], built  # bucket 64, then bucket 128 for 65 and 67
        assert answers == [1, 2, 3, 3], answers  # one gate answer per length, none for a repeat
        assert comm.kits.kept_bytes <= BUDGET_BYTES


def test_kept_bytes_stay_within_the_budget_under_a_thousand_lengths(mirror):
    """1000 distinct row counts through every operation: the kits' kept bytes never pass the budget
    (least recently used kits released, never a wholesale clear), the last call's kit is kept
    where it fits, and the kits' count is bounded by the buckets, not the lengths."""
    world, hidden = 4, 32
    mirror(world)
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    comm.kits.budget = 100_000  # a small budget, so that buckets compete for it
    codec = make_codec("int4/b32/e8m0")
    lengths = random.Random(31).sample(range(1, 1001), 1000)
    gen = torch.Generator().manual_seed(31)
    x_all = torch.randn(1000 * world, hidden, generator=gen).to(torch.bfloat16)
    for i, m in enumerate(lengths):
        x = x_all[:m * (world if i % 4 == 3 else 1)]
        op = i % 4
        if op == 0:
            comm.all_reduce(x, codec, algorithm="one_shot")
        elif op == 1:
            comm.all_reduce(x, codec, algorithm="two_shot")
        elif op == 2:
            comm.all_gather(x, codec)
        else:
            comm.reduce_scatter(x, codec)  # rows a multiple of the world size
        kept = [k.kept_bytes for k in comm.kits._kits.values()]
        assert comm.kits.kept_bytes == sum(kept) <= comm.kits.budget, (i, m)
    assert comm.stats.calls_fallback == 0 and comm.stats.calls_compressed == 1000
    assert comm.kits.built <= 4 * 13, "a kit per operation and row bucket (13 buckets up to 4096 rows)"
    assert 0 < comm.kits.kept_bytes
    recent = list(comm.kits._kits.values())[-1]  # the last call's kit is kept where it fits
    assert recent.kept_bytes or recent.nbytes > comm.kits.budget


def test_kits_are_keyed_by_codec_value(mirror):
    """Equal specs share one kit; equal specs with other calibration data do not; and a codec of
    equal value built anew (another layer, another call of make_codec) finds the same kit."""
    world, hidden = 2, 64
    mirror(world)
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    gen = torch.Generator().manual_seed(5)

    def params(scale: float) -> OutlierParams:
        lo = -torch.rand(world + 1, hidden, generator=gen) * scale
        hi = torch.rand(world + 1, hidden, generator=gen) * scale
        return OutlierParams.from_stats(lo, hi, select_outlier_channels(lo, hi, 4))

    a, b = params(3.0), params(5.0)
    x = torch.randn(8, hidden, generator=gen).to(torch.bfloat16)
    block1, block2 = make_codec("fp4_e2m1/b32/e8m0"), make_codec("fp4_e2m1/b32/e8m0")
    assert block1 == block2 and hash(block1) == hash(block2) and block1 is not block2
    comm.all_reduce(x, block1)
    comm.all_reduce(x, block2)
    assert comm.kits.built == 1
    hybrid_a, hybrid_a2 = make_codec("outlier+fp4_e2m1/b32/k4", a), make_codec("outlier+fp4_e2m1/b32/k4", a)
    hybrid_b = make_codec("outlier+fp4_e2m1/b32/k4", b)
    assert hybrid_a == hybrid_a2 and hybrid_a != hybrid_b
    out_a = comm.all_reduce(x, hybrid_a)
    assert torch.equal(comm.all_reduce(x, hybrid_a2), out_a) and comm.kits.built == 2
    out_b = comm.all_reduce(x, hybrid_b)
    assert comm.kits.built == 3, "other calibration data: a kit of its own"
    want_b = hybrid_b.decode_sum(torch.stack([hybrid_b.encode(x, source=0)] * world), hidden,
                                 sources=list(range(world)))
    assert torch.equal(out_b, want_b), "each codec's own parameters decode its payloads"


def test_reduce_scatter_lengths_share_a_bucket(mirror):
    """Sequence-parallel lengths (multiples of the world size) of one bucket share one kit."""
    world, hidden = 8, 64
    mirror(world)
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    codec = make_codec("int4/b16/bf16")
    gen = torch.Generator().manual_seed(7)
    for k in (9, 10, 11, 13, 16):  # 72..128 rows: bucket 128
        x = torch.randn(world * k, hidden, generator=gen).to(torch.bfloat16)
        out = comm.reduce_scatter(x, codec)
        assert out.shape == (k, hidden)
    assert comm.kits.built == 1 and comm.stats.calls_compressed == 5


def _compiled(rank, world):
    comm = CompressedComm(policy=GatePolicy(min_bytes=0, link="cpu"))
    codec = make_codec("fp4_e2m1/b32/e8m0")
    gen = torch.Generator().manual_seed(0)  # the same calibration on every rank
    lo, hi = -torch.rand(world + 1, 64, generator=gen) * 4, torch.rand(world + 1, 64, generator=gen) * 4
    hi[-1] *= 3  # the reduced sum's range is its own: decoding it as a rank's would differ
    static = make_codec("outlier_int4/k4", OutlierParams.from_stats(lo, hi, select_outlier_channels(lo, hi, 4)))
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(13, 64, generator=gen).to(torch.bfloat16), torch.randn(4 * world, 64, generator=gen)
    calls = {"one_shot": lambda t: comm.all_reduce(t * 1, codec, algorithm="one_shot"),
             "two_shot": lambda t: comm.all_reduce(t * 1, codec, algorithm="two_shot"),
             "two_shot static": lambda t: comm.all_reduce(t * 1, static, algorithm="two_shot"),
             "reduce_scatter": lambda t: comm.reduce_scatter(t * 1, codec),
             "all_gather": lambda t: comm.all_gather(t * 1, codec)}
    same = {}
    for name, fn in calls.items():
        t = x if "shot" in name else y
        same[name] = torch.equal(torch.compile(fn)(t), fn(t))
    return same


def test_torch_compile_runs_the_same_collectives():
    """Traced by torch.compile (the custom ops, the public collective functions), every operation
    gives the eager path's result bit for bit, uneven two-shot rows included, and a static codec's
    two-shot decodes the reduced chunks with the reduced sum's parameters; 2 gloo ranks."""
    for same in run_ranks(_compiled, 2):
        assert all(same.values()), same
