"""The one-rank harness (tpcomp_megatron/testing/onerank.py, tools/bench_prefill.py) on CPU.

A tiny Megatron GPTModel at TP=2 and TP=4 runs as rank 0 alone, its peers standing in through the
mirror process group (every peer holds what rank 0 holds). Every compressed all-reduce of its
forward is recorded, inputs and outputs; real gloo ranks that all hold those same inputs must get
bit for bit the same outputs from `CompressedComm` (two-shot: the rows of rank 0's chunk, the part
rank 0 alone reduces). A path that skipped a collective would not: the mutation tests make the
all-gather a no-op and check that the comparison catches it. The
benchmark itself (fake process group, eager timing, records) runs as a smoke test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpcomp_megatron.testing import run_ranks

ROOT = Path(__file__).resolve().parents[1]
SPEC = "fp4_e2m1/b32/e6m2"


def _tiny_cfg(tp: int):
    from tpcomp_megatron.models.core.config import LlamaModelConfig

    return LlamaModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                            num_kv_heads=4, head_dim=64, vocab_size=512, max_position_embeddings=64,
                            tensor_parallel_size=tp, params_dtype="float32")


def _record_forward(tp: int, algorithm: str, skip_gather: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0's compressed all-reduces in one forward of the tiny model under the mirror group."""
    from tpcomp_megatron.comm import transport
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.models.core.builder import build_gpt_model
    from tpcomp_megatron.testing.onerank import one_rank_tp

    calls = []
    with one_rank_tp(tp, backend="mirror"), torch.no_grad():
        torch.manual_seed(0)
        model = build_gpt_model(_tiny_cfg(tp), use_cpu_initialization=True).eval()
        handle = apply_tp_compression(model, CompressionConfig(spec=SPEC, min_bytes=0, algorithm=algorithm))
        comm = handle.comm
        original = comm.all_reduce

        def recording(x, codec, **kw):
            out = original(x, codec, **kw)
            calls.append((x.detach().clone(), out.detach().clone()))
            return out

        comm.all_reduce = recording
        tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(tp))
        pos = torch.arange(24).unsqueeze(0).expand(2, 24)
        saved = transport.all_gather, transport.gather_into
        if skip_gather:  # the mutation: the one-shot all-gather does nothing (as a broken path would)
            transport.all_gather = transport.gather_into = lambda out, inp, group=None: None
        try:
            model(tokens, pos, attention_mask=None)
        finally:
            transport.all_gather, transport.gather_into = saved
        assert handle.stats.calls_compressed == 4 and handle.stats.calls_fallback == 0
    return calls


def _gloo_all_reduce(rank: int, world: int, inputs: list[torch.Tensor], algorithm: str) -> list[torch.Tensor]:
    from tpcomp_megatron.codecs import make_codec, parse_codec_spec
    from tpcomp_megatron.comm import CompressedComm, GatePolicy

    comm = CompressedComm(None, GatePolicy(algorithm=algorithm, min_bytes=0, link="cpu"))
    codec = make_codec(parse_codec_spec(SPEC))
    return [comm.all_reduce(x, codec) for x in inputs]


def _rank0_part(t: torch.Tensor, tp: int, algorithm: str) -> torch.Tensor:
    """What rank 0 alone determines: the whole output (one-shot), or (two-shot, where rank i
    reduces chunk i and the mirror's peers can only repeat rank 0's chunk) rank 0's chunk of rows."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if algorithm == "one_shot" else rows[:-(-rows.shape[0] // tp)]


def _matches_gloo(calls, tp: int, algorithm: str) -> bool:
    results = run_ranks(_gloo_all_reduce, tp, [x for x, _ in calls], algorithm)
    return all(torch.equal(_rank0_part(got, tp, algorithm), _rank0_part(out, tp, algorithm))
               for rank_outs in results for got, (_, out) in zip(rank_outs, calls))


@pytest.mark.parametrize("tp,algorithm", [(2, "one_shot"), (4, "two_shot"), (4, "one_shot")])
def test_one_rank_harness_matches_real_ranks(tp, algorithm):
    calls = _record_forward(tp, algorithm)
    assert len(calls) == 4 and all(x.abs().sum() > 0 for x, _ in calls)
    assert _matches_gloo(calls, tp, algorithm)


@pytest.mark.parametrize("tp,algorithm", [(2, "one_shot"), (4, "two_shot")])
def test_a_skipped_collective_is_caught(tp, algorithm):
    calls = _record_forward(tp, algorithm, skip_gather=True)
    assert not _matches_gloo(calls, tp, algorithm)


def test_mirror_group_collectives():
    """The mirror group's answers, against what N ranks holding equal tensors would get."""
    import torch.distributed as dist

    from tpcomp_megatron.testing.onerank import one_rank_tp

    with one_rank_tp(4, backend="mirror"):
        x = torch.randn(8, 3)
        y = x.clone()
        dist.all_reduce(y)
        assert torch.equal(y, 4 * x)
        out = torch.empty(32, 3)
        dist.all_gather_into_tensor(out, x)
        assert torch.equal(out, x.repeat(4, 1))
        a2a = torch.empty(8, 3)
        dist.all_to_all_single(a2a, x)
        assert torch.equal(a2a, x[:2].repeat(4, 1))
        rs = torch.empty(2, 3)
        dist.reduce_scatter_tensor(rs, x)
        assert torch.equal(rs, 4 * x[:2])


def test_bench_prefill_smoke(tmp_path):
    """tools/bench_prefill.py on CPU (fake group, tiny shape, TP=2 and 4): records with the fields
    of benchmarks/results/README.md, one per codec and mode, compressed collectives counted."""
    out = tmp_path / "prefill.jsonl"
    subprocess.run([sys.executable, str(ROOT / "tools" / "bench_prefill.py"), "--device", "cpu", "--shape", "tiny",
                    "--tp", "2", "4", "--layers", "2", "--prompts", "16", "--reps", "1", "--codecs", SPEC,
                    "--out", str(out)], check=True, cwd=tmp_path, capture_output=True, timeout=600)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["world_size"], r["codec"]) for r in recs] == [(2, "none"), (2, SPEC), (4, "none"), (4, SPEC)]
    for r in recs:
        for key in ("model", "layers", "batch", "prompt_tokens", "algorithm", "mode", "ms", "baseline_ms",
                    "overhead_pct", "collectives", "overhead_us_per_collective", "device", "date", "command", "git"):
            assert key in r, key
    assert [r["collectives"] for r in recs] == [0, 4, 0, 4]


def test_bench_serving_smoke(tmp_path):
    """tools/bench_serving.py on CPU (mirror group, tiny shape, TP=2): a prefill record over distinct
    prompt lengths and a decode record per batch, with the fields of shared/RESULTS.md, every
    prefill collective compressed, and the Markdown page."""
    out, md = tmp_path / "serving.jsonl", tmp_path / "serving.md"
    subprocess.run([sys.executable, str(ROOT / "tools" / "bench_serving.py"), "--device", "cpu", "--shape", "tiny",
                    "--layers", "2", "--models", "13b", "--requests", "4", "--max-tokens", "96", "--batches", "1", "8",
                    "--steps", "2", "--codec", SPEC, "--out", str(out), "--md", str(md)],
                   check=True, cwd=tmp_path, capture_output=True, timeout=600)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["phase"], r.get("batch")) for r in recs] == [("prefill", None), ("decode", 1), ("decode", 8)]
    for r in recs:
        for key in ("model", "layers", "world_size", "codec", "overhead_pct_p50", "overhead_pct_p90", "device", "date",
                    "git", "command"):
            assert key in r, key
    prefill = recs[0]
    for key in ("requests", "length_distribution", "first_request_overhead_pct", "kept_payload_bytes", "plans_built"):
        assert key in prefill, key
    assert prefill["requests"] == 4 and prefill["requests_not_all_compressed"] == 0
    assert prefill["plans_built"] <= 4, "a kit per row bucket (lengths 32-96: buckets 64 and 128)"
    assert "## Prefill" in md.read_text() and "## Decode" in md.read_text()
