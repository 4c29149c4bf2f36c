"""The quality tools on a tiny random Llama: simulated-TP layout against the converter and against
real gloo ranks, calibration (deterministic, brute-force selection on planted outlier channels),
the evaluation's metrics against a direct computation, and calibration-file mismatch errors.
The sensitivity tool's tests are in test_sensitivity.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from quality_helpers import CONFIG, PLANTED, SEQ, WINDOWS, make_tiny_model, quiet

from tpcomp_megatron.calibration import RULES, load_calibration
from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.quality.calibrate_cli import CalibrateConfig, calibrate
from tpcomp_megatron.quality.eval_cli import EvalConfig, evaluate
from tpcomp_megatron.quality.partition import RowParallelShapes, rank_columns
from tpcomp_megatron.quality.realtp import RealPoint, convert_checkpoint, rank_evaluate, rank_partial_sums
from tpcomp_megatron.quality.simtp import SimulatedTP
from tpcomp_megatron.quality.sweep import SweepPoint
from tpcomp_megatron.quality.text import make_windows
from tpcomp_megatron.testing import run_ranks


# -- layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv,d,ffn,tp", [(6, 3, 16, 90, 2), (6, 3, 16, 90, 4), (9, 3, 8, 100, 8), (4, 1, 16, 64, 8)])
def test_rank_columns_match_converter_shards(heads, kv, d, ffn, tp):
    """Rank r's simulated columns are exactly the non-zero columns of the converter's shard r."""
    from tpcomp_megatron.convert import hf_to_megatron, shard_for_rank
    from tpcomp_megatron.convert.mapping import expected_hf_shapes
    from tpcomp_megatron.models import LlamaModelConfig

    hidden = 32
    cfg = LlamaModelConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                           num_kv_heads=kv, head_dim=d, vocab_size=64, max_position_embeddings=32, tensor_parallel_size=tp)
    tensors = {k: torch.rand(s) + 1.0 for k, s in expected_hf_shapes(cfg).items()}  # no zeros in real columns
    glob = hf_to_megatron(cfg, tensors.__getitem__)
    shapes = RowParallelShapes(num_heads=heads, num_kv_heads=kv, head_dim=d, ffn_hidden_size=ffn)
    for kind, hf_key in (("linear_proj", "self_attn.o_proj"), ("linear_fc2", "mlp.down_proj")):
        name = f"decoder.layers.0.{'self_attention' if kind == 'linear_proj' else 'mlp'}.{kind}.weight"
        w = tensors[f"model.layers.0.{hf_key}.weight"]
        for r, cols in enumerate(rank_columns(kind, shapes, tp)):
            shard = shard_for_rank(name, glob[name], r, tp)
            real = shard[:, shard.abs().sum(0) > 0]
            assert torch.equal(real, w[:, cols]), (kind, r)


# -- real ranks -------------------------------------------------------------------------------
def _rank_job(rank, world, ckpt, windows, points):
    return rank_partial_sums(rank, world, ckpt, windows.inputs[:1]), rank_evaluate(rank, world, ckpt, windows, points)


def test_simulated_tp_matches_real_ranks(tiny):
    """TP=2 on two gloo ranks (converted checkpoint, padded heads and FFN) against the simulation:
    same partial sums, same uncompressed perplexity, nearly the same compressed perplexity."""
    from tpcomp_megatron.quality.models import load_model
    from tpcomp_megatron.quality.sweep import run_simulated

    model, tok, model_id = load_model(tiny["hf"])
    windows = make_windows(tok, tiny["text"], seq_len=SEQ, windows=WINDOWS)
    ckpt = convert_checkpoint(tiny["hf"], 2, model_id=model_id, out=tiny["root"] / "mg_tp2")
    specs = ["int8/b32/bf16", "fp4_e2m1/b32/e8m0"]
    parts, real = zip(*run_ranks(_rank_job, 2, str(ckpt), windows, [RealPoint(spec=s) for s in specs], timeout_s=300))
    sim = SimulatedTP(model)
    captured = {}
    with torch.no_grad(), sim.session(tp=2, observer=lambda n, p: captured.__setitem__(n, p.clone())):
        model(windows.inputs[:1])
    assert sorted(captured) == sorted(parts[0])
    for name, p in captured.items():
        got = torch.stack([parts[r][name][0] for r in range(2)])
        # Both sides multiply in fp32; the inputs differ only by attention arithmetic (eager HF vs
        # Megatron), ~1e-7 relative per op: 1e-5 of the layer's largest value leaves a wide margin
        # and still catches a misplaced head or column (O(1) differences).
        assert (got - p).abs().max() <= 1e-5 * p.abs().max(), name
    points = [SweepPoint(spec=s, tp=2) for s in specs]
    res = run_simulated(model, sim, windows, points, {})
    base, totals = real[0][0], real[0][1]
    assert base.tokens == res.baseline.tokens == windows.tokens_scored
    assert base.ppl == pytest.approx(res.baseline.ppl, rel=1e-5)
    # int8: a 1e-6 input difference flips almost no codes; fp4 codes are coarser, a flip costs more.
    assert totals[0].ppl == pytest.approx(res.totals[points[0]].ppl, rel=1e-4)
    assert totals[1].ppl == pytest.approx(res.totals[points[1]].ppl, rel=2e-2)
    assert real[0][3] == [0, 0]  # min_bytes=0: no call fell back to the exact collective


def _feedback_rank_job(rank, world, ckpt, tokens):
    """Two forwards of the same tokens with error feedback on: equal only if every forward starts
    without the previous forward's debt; then `remove()` takes the reset hook off again."""
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.quality.realtp import _forward, _megatron

    with _megatron(ckpt, world) as (model, cfg):
        config = CompressionConfig(spec="fp4_e2m1/b32/e8m0", min_bytes=0, link="cpu", error_feedback=True)
        handle = apply_tp_compression(model, config)
        first = _forward(model, tokens, cfg.vocab_size)
        owed = handle.feedback.debt is not None
        second = _forward(model, tokens, cfg.vocab_size)
        hooks = len(model._forward_pre_hooks)
        handle.remove()
        return torch.equal(first, second), owed, hooks - len(model._forward_pre_hooks)


def test_error_feedback_real_ranks_match_simulation(tiny):
    """`--tp-comm-error-feedback` as deployed (two gloo ranks, eval-quality --real-ranks) agrees with
    the simulated feedback, and both beat the same codec without it; each forward starts debt-free."""
    from tpcomp_megatron.quality.models import load_model

    _, tok, _ = load_model(tiny["hf"])
    points = ("fp4_e2m1/b32/e8m0", "fp4_e2m1/b32/e8m0:feedback=on")
    common = dict(model=tiny["hf"], tp=(2,), points=points, text=tiny["text"], seq_len=SEQ, windows=WINDOWS)
    sim = evaluate(EvalConfig(**common, out=str(tiny["root"] / "fb_sim.jsonl")), log=quiet)
    real = evaluate(EvalConfig(**common, real_ranks=True, out=str(tiny["root"] / "fb_real.jsonl")), log=quiet)
    assert [r["error_feedback"] for r in sim] == [r["error_feedback"] for r in real] == [False, True]
    for s, r in zip(sim, real):
        # The same codes on both sides but for ~1e-7 input differences (see the test above).
        assert r["kl"] == pytest.approx(s["kl"], rel=5e-2), (s["codec"], s["kl"], r["kl"])
    assert sim[1]["kl"] < 0.8 * sim[0]["kl"] and real[1]["kl"] < 0.8 * real[0]["kl"]
    ckpt = convert_checkpoint(tiny["hf"], 2, model_id="tiny", out=tiny["root"] / "mg_tp2_fb")
    windows = make_windows(tok, tiny["text"], seq_len=SEQ, windows=1)
    for same, owed, hooks_removed in run_ranks(_feedback_rank_job, 2, str(ckpt), windows.inputs, timeout_s=300):
        assert same and owed and hooks_removed == 1


# -- calibration ------------------------------------------------------------------------------
def _reference_stats(model, windows, tp):
    """Per-layer [tp + 1, hidden] min/max by plain chunking (TP=3 splits heads and FFN evenly)."""
    inputs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind, lin in (("self_attention.linear_proj", layer.self_attn.o_proj), ("mlp.linear_fc2", layer.mlp.down_proj)):
            name = f"decoder.layers.{i}.{kind}"
            hooks.append(lin.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, []).append(a[0][0])))
    with torch.no_grad():
        for w in range(windows.inputs.shape[0]):
            model(windows.inputs[w:w + 1])
    for h in hooks:
        h.remove()
    stats = {}
    for i, layer in enumerate(model.model.layers):
        for kind, lin in (("self_attention.linear_proj", layer.self_attn.o_proj), ("mlp.linear_fc2", layer.mlp.down_proj)):
            name = f"decoder.layers.{i}.{kind}"
            x = torch.cat(inputs[name])
            parts = [xc @ wc.T for xc, wc in zip(x.chunk(tp, dim=1), lin.weight.detach().chunk(tp, dim=1))]
            rows = parts + [sum(parts)]
            stats[name] = (torch.stack([p.amin(0) for p in rows]), torch.stack([p.amax(0) for p in rows]))
    return stats


def _brute_force_select(lo, hi, k, rule):
    ranks, hidden = lo.shape[0] - 1, lo.shape[1]
    score = []
    for c in range(hidden):
        rng = [float(hi[r, c]) - float(lo[r, c]) for r in range(ranks)]
        if rule == "range_sum":
            score.append(sum(rng))
        elif rule == "range_sq_sum":
            score.append(sum(v * v for v in rng))
        else:
            score.append(max(max(abs(float(hi[r, c])), abs(float(lo[r, c]))) for r in range(ranks)))
    return sorted(sorted(range(hidden), key=lambda c: (-score[c], c))[:k])


def test_calibration_deterministic_and_matches_brute_force(tiny):
    from tpcomp_megatron.quality.models import load_model

    root, tp = tiny["root"], 3
    paths = []
    for run in range(2):
        cfg = CalibrateConfig(model=tiny["hf"], tp=(tp,), output=str(root / f"cal{run}_tp{{tp}}.safetensors"),
                              text=tiny["cal_text"], tokens=2 * SEQ, seq_len=SEQ, ratio=32, rule="range_sum")
        paths += calibrate(cfg, log=quiet)
    assert paths[0].read_bytes() == paths[1].read_bytes()  # bit-identical statistics, channels and metadata
    cal = load_calibration(str(paths[0]))
    assert cal.meta["tp_size"] == tp and cal.meta["hidden"] == CONFIG["hidden_size"] and cal.meta["codec"] == "outlier_int4/k32"
    model, tok, _ = load_model(tiny["hf"])
    ref = _reference_stats(model, make_windows(tok, tiny["cal_text"], seq_len=SEQ, windows=2), tp)
    assert sorted(ref) == sorted(cal.stats) == sorted(cal.meta["layers"])
    k = math.ceil(CONFIG["hidden_size"] / 32)
    for rule in RULES:
        chosen = cal.reselect(rule=rule)
        for name, (lo, hi) in ref.items():
            torch.testing.assert_close(cal.stats[name][0], lo, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cal.stats[name][1], hi, rtol=1e-5, atol=1e-5)
            assert chosen.channels[name].tolist() == _brute_force_select(*cal.stats[name], k, rule), (rule, name)
            planted = PLANTED["o_proj" if "linear_proj" in name else "down_proj"]
            assert chosen.channels[name].tolist() == planted, (rule, name)


# -- evaluation -------------------------------------------------------------------------------
def _direct_scores(model, inputs, tp, codec):
    """Perplexity, top-1 agreement and KL by a direct computation: hooks replace each row-parallel
    output with the decoded sum of the codec's per-rank payloads (TP=3: even column chunks)."""
    def hook(mod, args, out):
        x = args[0].reshape(-1, args[0].shape[-1])
        # Same arithmetic as the simulation (F.linear on a contiguous weight slice), so codes match.
        parts = [F.linear(xc, wc.contiguous()) for xc, wc in zip(x.chunk(tp, dim=1), mod.weight.chunk(tp, dim=1))]
        payloads = torch.stack([codec.encode(p, source=r) for r, p in enumerate(parts)])
        return codec.decode_sum(payloads, out.shape[-1], range(tp), dtype=out.dtype).reshape(out.shape)

    nll_ref = nll = agree = kl = n = 0.0
    diffs = []
    with torch.no_grad():
        for w in inputs:
            ref = model(w[None]).logits[0, :-1]
            hooks = [lin.register_forward_hook(hook) for layer in model.model.layers for lin in (layer.self_attn.o_proj, layer.mlp.down_proj)]
            got = model(w[None]).logits[0, :-1]
            for h in hooks:
                h.remove()
            nll_ref += F.cross_entropy(ref.double(), w[1:], reduction="sum").item()
            nll += F.cross_entropy(got.double(), w[1:], reduction="sum").item()
            diffs.append(F.cross_entropy(got.double(), w[1:], reduction="none") - F.cross_entropy(ref.double(), w[1:], reduction="none"))
            agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
            kl += F.kl_div(got.double().log_softmax(-1), ref.double().log_softmax(-1), log_target=True, reduction="sum").item()
            n += w.numel() - 1
    d = torch.cat(diffs)
    se_pct = 100 * d.mean().exp().item() * (d.std() / math.sqrt(d.numel())).item()
    return math.exp(nll_ref / n), math.exp(nll / n), agree / n, kl / n, se_pct


def test_eval_tool_metrics_equal_direct_computation(tiny):
    from tpcomp_megatron.quality.models import load_model

    out = tiny["root"] / "eval.jsonl"
    specs = ("fp4_e2m1/b32/e8m0", "int4/b16/bf16")
    recs = evaluate(EvalConfig(model=tiny["hf"], tp=(3,), points=specs, text=tiny["text"], seq_len=SEQ, windows=WINDOWS,
                               out=str(out)), log=quiet)
    assert len(out.read_text().splitlines()) == len(specs)
    model = load_model(tiny["hf"])[0]  # loaded as the tool loads it (same attention implementation)
    text = Path(tiny["text"].removeprefix("file:")).read_text()
    ids = torch.tensor([ord(c) for c in text[:SEQ * WINDOWS]]).view(WINDOWS, SEQ)
    for rec, spec in zip(recs, specs):
        base, ppl, top1, kl, se = _direct_scores(model, ids, 3, make_codec(spec))
        assert rec["codec"] == spec and rec["world_size"] == 3 and rec["simulated_tp"] is True
        assert rec["tokens_scored"] == WINDOWS * (SEQ - 1) and rec["calibration"] == "none"
        assert rec["baseline_ppl"] == pytest.approx(base, rel=1e-6)
        assert rec["ppl"] == pytest.approx(ppl, rel=1e-6)
        assert rec["top1_agreement"] == pytest.approx(top1, abs=1e-9)
        assert rec["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert rec["ppl_increase_pct"] == pytest.approx(100 * (ppl / base - 1), rel=1e-5, abs=1e-6)
        assert rec["ppl_increase_se_pct"] == pytest.approx(se, rel=1e-4)
        for key in ("device", "date", "command", "git", "bits_per_value", "text"):
            assert rec[key]


def test_lowrank_codec_real_ranks_match_simulation(tiny):
    """A calibrated low-rank codec (bases from `tpcomp-calibrate`, real-rank sketches) through
    `apply_tp_compression` on two gloo ranks scores as the simulation does, with and without
    error feedback; and its bases capture most of each rank's partial sums."""
    root = tiny["root"]
    cals = {}
    for real in (False, True):
        cals[real] = calibrate(CalibrateConfig(model=tiny["hf"], tp=(2,), output=str(root / f"lr{int(real)}_tp{{tp}}.safetensors"),
                                               text=tiny["cal_text"], tokens=SEQ, seq_len=SEQ, real_ranks=real), log=quiet)[0]
    sim_cal, real_cal = load_calibration(str(cals[False])), load_calibration(str(cals[True]))
    for name, b in sim_cal.bases.items():  # the same leading directions, sketched by either path
        for src in range(3):
            overlap = (b[src, :2] @ real_cal.bases[name][src, :2].T).pow(2).sum() / 2
            assert overlap > 0.99, (name, src, overlap)
    coded = "lowrank+fp4_e2m1/b16/e6m2/r16/cfp4_e2m1"  # 16 coordinates block-coded
    points = ("lowrank+fp4_e2m1/b32/e6m2/r2", "lowrank+fp4_e2m1/b32/e6m2/r2:feedback=on", f"{coded}:feedback=on")
    base = dict(model=tiny["hf"], tp=(2,), points=points, text=tiny["text"], seq_len=SEQ, windows=1,
                calibration=str(cals[False]))
    sim = evaluate(EvalConfig(out=str(root / "lr_sim.jsonl"), **base), log=quiet)
    real = evaluate(EvalConfig(out=str(root / "lr_real.jsonl"), real_ranks=True, **base), log=quiet)
    bits = {"lowrank+fp4_e2m1/b32/e6m2/r2": 4.25 + 16 * 2 / CONFIG["hidden_size"],
            coded: 4.5 + 4.5 * 16 / CONFIG["hidden_size"]}
    assert [s["codec"] for s in sim] == [r["codec"] for r in real] == [p.split(":")[0] for p in points]
    for s, r in zip(sim, real):
        assert s["outlier_rule"] is None
        assert s["bits_per_value"] == pytest.approx(bits[s["codec"]], abs=1e-4)  # recorded rounded
        assert r["ppl"] == pytest.approx(s["ppl"], rel=2e-2) and r["exact_fallback_calls"] == 0
        assert s["kl"] > 0


def test_mismatched_calibration_file_is_a_clear_error(tiny, capsys):
    from tpcomp_megatron.quality.eval_cli import main

    root = tiny["root"]
    cal = calibrate(CalibrateConfig(model=tiny["hf"], tp=(3,), output=str(root / "mm_tp{tp}.safetensors"),
                                    text=tiny["cal_text"], tokens=SEQ, seq_len=SEQ), log=quiet)[0]
    base = dict(model=tiny["hf"], points=("outlier_int4/k64",), text=tiny["text"], seq_len=SEQ, windows=1,
                out=str(root / "mm.jsonl"))
    with pytest.raises(ValueError, match="made at TP=3, the model runs at TP=2"):
        evaluate(EvalConfig(tp=(2,), calibration=str(cal), **base), log=quiet)
    same_text = calibrate(CalibrateConfig(model=tiny["hf"], tp=(3,), output=str(root / "same_tp{tp}.safetensors"),
                                          text=tiny["text"], tokens=SEQ, seq_len=SEQ), log=quiet)[0]
    with pytest.raises(ValueError, match="the evaluation text"):
        evaluate(EvalConfig(tp=(3,), calibration=str(same_text), **base), log=quiet)
    with pytest.raises(ValueError, match="need --calibration"):
        evaluate(EvalConfig(tp=(3,), **base), log=quiet)
    # Another model of the same width: named in the error.
    other = make_tiny_model(root / "other", seed=1)
    del other
    with pytest.raises(ValueError, match="it was made for model 'hf', not 'other'"):
        evaluate(EvalConfig(tp=(3,), calibration=str(cal), **{**base, "model": str(root / "other")}), log=quiet)
    # The console script reports it and exits with 2, no traceback.
    assert main(["--model", tiny["hf"], "--tp", "2", "--codecs", "outlier_int4/k64", "--calibration", str(cal),
                 "--text", tiny["text"], "--seq-len", str(SEQ), "--windows", "1", "--out", str(root / "mm.jsonl")]) == 2
    assert "made at TP=3" in capsys.readouterr().err
    assert not (root / "mm.jsonl").exists()


def test_configs_reject_bad_input():
    with pytest.raises(ValueError, match="'\\{tp\\}'"):
        CalibrateConfig(model="m", tp=(2, 4), output="cal.safetensors")
    with pytest.raises(ValueError, match="multiple of --seq-len"):
        CalibrateConfig(model="m", tp=(2,), output="c", tokens=100, seq_len=64)
    for bad in (0, 129):
        with pytest.raises(ValueError, match=r"--directions must be in \[1, 128\]"):
            CalibrateConfig(model="m", tp=(2,), output="c", directions=bad)
    with pytest.raises(ValueError, match="bad option 'foo=1'"):
        SweepPoint.parse("fp4_e2m1/b32:foo=1", 2)
    with pytest.raises(ValueError, match="outlier codecs only"):
        SweepPoint.parse("fp4_e2m1/b32:rule=range_sum", 2)
    with pytest.raises(ValueError, match="simulation-only"):
        EvalConfig(model="m", points=("fp4_e2m1/b32/e8m0",), real_ranks=True, rotation=64)
    with pytest.raises(ValueError, match="in front of a block codec"):
        EvalConfig(model="m", points=("outlier_int4/k64",), rotation=64)
    with pytest.raises(ValueError, match="unknown codec 'rot64\\+fp4_e2m1'"):  # a flag now, not a spec
        SweepPoint.parse("rot64+fp4_e2m1/b32/e8m0", 2)
    with pytest.raises(ValueError, match="TP=1 communicates nothing"):
        SweepPoint.parse("fp4_e2m1/b32", 1)


def test_checkpoint_cache_folder_is_created(tiny):
    """The real-rank path converts into a cache folder that a fresh machine does not have yet."""
    out = tiny["root"] / "fresh" / "cache" / "megatron" / "tiny-tp2"
    ckpt = convert_checkpoint(tiny["hf"], 2, model_id="tiny", out=out)
    assert ckpt == out and any(out.iterdir())
    assert convert_checkpoint(tiny["hf"], 2, model_id="tiny", out=out) == out  # cached: no second conversion
