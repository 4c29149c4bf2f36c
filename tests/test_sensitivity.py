"""`tpcomp-sensitivity` on the tiny random Llama: per-layer ranking and promotion plans against
single-layer runs and the evaluation tool, plans on real gloo ranks, budget plans, and the
per-layer allocation against exhaustive search."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from quality_helpers import CONFIG, SEQ, WINDOWS, quiet

from tpcomp_megatron.codecs import make_codec
from tpcomp_megatron.quality.calibrate_cli import CalibrateConfig, calibrate
from tpcomp_megatron.quality.eval_cli import EvalConfig, evaluate
from tpcomp_megatron.quality.simtp import SimulatedTP
from tpcomp_megatron.quality.text import make_windows


def test_sensitivity_ranking_and_mixed_plans(tiny):
    """Each layer's score is the KL of compressing that layer alone (checked against a direct
    single-layer run for the top layer); the plans promote exactly the top-k layers; k = 0 and
    k = all equal the uniform codecs' records of the evaluation tool; bits are the layer mean."""
    from tpcomp_megatron.quality.models import load_model
    from tpcomp_megatron.quality.sweep import Plan, compare
    from tpcomp_megatron.quality.sensitivity_cli import SensitivityConfig, run

    low, high = "fp4_e2m1/b32/e8m0", "fp8_e4m3/b32/e8m0up"
    model, tok, _ = load_model(tiny["hf"])
    n_layers = 2 * model.config.num_hidden_layers
    ranking = tiny["root"] / "ranking.json"
    cfg = SensitivityConfig(model=tiny["hf"], tp=3, low=low, high=high, promote=(0, 1, n_layers), calib_text=tiny["cal_text"],
                            calib_windows=1, text=tiny["text"], windows=WINDOWS, seq_len=SEQ, out=str(tiny["root"] / "sens.jsonl"),
                            ranking=str(ranking))
    recs = run(cfg, log=quiet)
    kl = json.loads(ranking.read_text())["kl"]
    order = list(kl)
    assert len(order) == n_layers and all(kl[a] >= kl[b] for a, b in zip(order, order[1:]))
    assert len(set(kl.values())) > 1  # the layers differ: a ranking that means something

    sim = SimulatedTP(model)
    cal = make_windows(tok, tiny["cal_text"], seq_len=SEQ, windows=1)
    _, (top,), _ = compare(model, sim, cal, [Plan(3, {n: make_codec(low) if n == order[0] else None for n in sim.layers})])
    assert top.mean_kl == pytest.approx(kl[order[0]], rel=1e-6)
    sim.remove()

    assert [r["layers_high"] for r in recs] == [[], order[:1], order]
    lb, hb = make_codec(low).bits_per_value(96), make_codec(high).bits_per_value(96)
    assert recs[1]["bits_per_value"] == pytest.approx(((n_layers - 1) * lb + hb) / n_layers, abs=1e-4)
    uniform = evaluate(EvalConfig(model=tiny["hf"], tp=(3,), points=(low, high), text=tiny["text"], seq_len=SEQ,
                                  windows=WINDOWS, out=str(tiny["root"] / "uniform.jsonl")), log=quiet)
    for mixed, ref in ((recs[0], uniform[0]), (recs[2], uniform[1])):
        for key in ("ppl", "baseline_ppl", "top1_agreement", "kl", "bits_per_value"):
            assert mixed[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key

    # A saved ranking is reused as is (same plan, same scores); one made for another TP size is refused.
    again = run(dataclasses.replace(cfg, promote=(1,), ranking=None, ranking_in=str(ranking)), log=quiet)
    assert again[0]["layers_high"] == order[:1] and again[0]["kl"] == pytest.approx(recs[1]["kl"], rel=1e-9)
    with pytest.raises(ValueError, match="was made for"):
        run(dataclasses.replace(cfg, tp=2, ranking=None, ranking_in=str(ranking)), log=quiet)


def test_sensitivity_plans_on_real_ranks(tiny, monkeypatch):
    """--real-ranks runs each plan as deployed (the converted model on two gloo ranks, one override
    per promoted layer) and agrees with the simulated plan; the overrides take effect (every layer
    promoted to FP8 is far closer to the exact model than the uniform FP4 plan)."""
    from tpcomp_megatron.quality.sensitivity_cli import SensitivityConfig, run

    monkeypatch.setenv("TPCOMP_CACHE", str(tiny["root"] / "cache"))  # the converted checkpoint goes there
    n_layers = 2 * CONFIG["num_hidden_layers"]
    cfg = SensitivityConfig(model=tiny["hf"], tp=2, low="fp4_e2m1/b32/e8m0", high="fp8_e4m3/b32/e8m0up",
                            promote=(0, 1, n_layers), calib_text=tiny["cal_text"], calib_windows=1, text=tiny["text"],
                            windows=WINDOWS, seq_len=SEQ, out=str(tiny["root"] / "sens_real.jsonl"), real_ranks=True)
    recs = run(cfg, log=quiet)
    assert [r["simulated_tp"] for r in recs] == [True] * 3 + [False] * 3
    sim, real = recs[:3], recs[3:]
    for s, r in zip(sim, real):
        assert (r["codec"], r["layers_high"], r["bits_per_value"]) == (s["codec"], s["layers_high"], s["bits_per_value"])
        assert r["baseline_ppl"] == pytest.approx(s["baseline_ppl"], rel=1e-5)
        # measured agreement ~1e-7 (same codes on both sides); a plan that lost an override is off by 3-50x
        assert r["kl"] == pytest.approx(s["kl"], rel=1e-3)
        assert r["exact_fallback_calls"] == 0
    assert real[2]["kl"] < real[0]["kl"] / 5


def test_sensitivity_plans_with_calibrated_lowrank_codecs(tiny, monkeypatch):
    """Low-rank codecs (per-layer bases from a calibration file) as --low and --high: the uniform
    plan equals the evaluation tool's record, and the deployed plan on two gloo ranks (low-rank
    codec plus per-layer low-rank overrides) agrees with the simulated one."""
    from tpcomp_megatron.quality.sensitivity_cli import SensitivityConfig, run

    monkeypatch.setenv("TPCOMP_CACHE", str(tiny["root"] / "cache"))
    cal = calibrate(CalibrateConfig(model=tiny["hf"], tp=(2,), output=str(tiny["root"] / "sens_lr_tp{tp}.safetensors"),
                                    text=tiny["cal_text"], tokens=SEQ, seq_len=SEQ), log=quiet)[0]
    low, high = "lowrank+fp4_e2m1/b32/e6m2/r2", "lowrank+fp8_e4m3/b32/e6m2/r2"
    cfg = SensitivityConfig(model=tiny["hf"], tp=2, low=low, high=high, promote=(0, 2), calib_text=tiny["cal_text"],
                            calib_windows=1, text=tiny["text"], windows=1, seq_len=SEQ, calibration=str(cal),
                            out=str(tiny["root"] / "sens_lr.jsonl"), real_ranks=True)
    recs = run(cfg, log=quiet)
    assert [r["simulated_tp"] for r in recs] == [True, True, False, False]
    assert recs[1]["codec"] == f"{low} + 2 layers {high}" and recs[1]["calibration"] != "none"
    uniform = evaluate(EvalConfig(model=tiny["hf"], tp=(2,), points=(low,), text=tiny["text"], seq_len=SEQ, windows=1,
                                  calibration=str(cal), out=str(tiny["root"] / "sens_lr_uniform.jsonl")), log=quiet)[0]
    assert recs[0]["kl"] == pytest.approx(uniform["kl"], rel=1e-6)
    for s, r in zip(recs[:2], recs[2:]):
        assert r["ppl"] == pytest.approx(s["ppl"], rel=2e-2) and r["exact_fallback_calls"] == 0
    assert recs[3]["kl"] < recs[2]["kl"]  # the promoted layers took their wider codec on the real ranks


def test_sensitivity_config_rejects_bad_input():
    from tpcomp_megatron.quality.sensitivity_cli import SensitivityConfig

    with pytest.raises(ValueError, match="test set"):
        SensitivityConfig(model="m", calib_text="moby-dick", text="moby-dick")
    with pytest.raises(ValueError, match="need --calibration"):
        SensitivityConfig(model="m", low="outlier_int4/k64")
    with pytest.raises(ValueError, match="need --calibration"):
        SensitivityConfig(model="m", low="lowrank+fp4_e2m1/b32/e6m2/r4")
    with pytest.raises(ValueError, match="--low none"):
        SensitivityConfig(model="m", low="none")
    with pytest.raises(ValueError, match="TP=1"):
        SensitivityConfig(model="m", tp=1)
    with pytest.raises(ValueError, match="--promote"):
        SensitivityConfig(model="m", promote=(-1,))
    with pytest.raises(ValueError, match="--budget"):
        SensitivityConfig(model="m", budget=0.0)
    with pytest.raises(ValueError, match="need --calibration"):
        SensitivityConfig(model="m", high=("fp6_e2m3/b32", "outlier_int4/k64"))
    assert SensitivityConfig(model="m", high="fp8_e4m3").high == ("fp8_e4m3",)


def test_budget_plans():
    """The budget's k is the largest whose plan mean is within it (fresh sensitivities, so the
    order is not the layer order); --promote and budget plans per --high codec, k = 0 once."""
    from tpcomp_megatron.quality.sensitivity import budget_promotions, mixed_codecs, plan_bits
    from tpcomp_megatron.quality.sensitivity_cli import SensitivityConfig, _promotions, parse_args

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    sens = {f"l{i}": float(v) for i, v in enumerate(torch.rand(10, generator=gen))}
    low, fp6, fp8 = ({n: make_codec(s) for n in sens} for s in ("fp4_e2m1/b32/e8m0", "fp6_e2m3/b32/e8m0", "fp8_e4m3/b32/e8m0"))
    for budget in (4.0, 4.25, 4.5, 4.65, 5.0, 9.0):
        for high in (fp6, fp8):
            k = budget_promotions(sens, low, high, 64, budget)
            brute = max([j for j in range(11) if plan_bits(mixed_codecs(sens, low, high, j), 64) <= budget + 1e-9],
                        default=0)
            assert k == brute, (budget, str(high["l0"].spec))
    assert budget_promotions(sens, low, fp8, 64, 4.65) == 1 and budget_promotions(sens, low, fp6, 64, 4.65) == 2
    cfg = SensitivityConfig(model="m", high=("fp6_e2m3/b32/e8m0", "fp8_e4m3/b32/e8m0"), promote=(0, 2), budget=4.65)
    codecs = {"fp4_e2m1/b32/e8m0": low, "fp6_e2m3/b32/e8m0": fp6, "fp8_e4m3/b32/e8m0": fp8}
    got = _promotions(cfg, sens, "fp4_e2m1/b32/e8m0", codecs, 64)
    assert [(c.fields["plan_high"], len(c.fields["layers_high"])) for c in got] == [
        ("fp6_e2m3/b32/e8m0", 0), ("fp6_e2m3/b32/e8m0", 2), ("fp8_e4m3/b32/e8m0", 2), ("fp8_e4m3/b32/e8m0", 1)]
    for c in got:  # each plan's codecs: the promoted layers on their --high codec, the rest on --low
        high, top = c.fields["plan_high"], c.fields["layers_high"]
        assert c.specs == {n: high if n in top else "fp4_e2m1/b32/e8m0" for n in sens}
    a = parse_args(["--model", "m", "--budget", "4.5", "--high", "fp5_e2m2/b32/e6m2", "fp6_e2m3/b32/e6m2"])
    assert a.promote == () and a.budget == 4.5 and len(a.high) == 2
    with pytest.raises(ValueError, match="--promote"):
        SensitivityConfig(model="m", promote=())


def test_allocate_matches_brute_force():
    """The allocation is the least summed KL within the budget, as an exhaustive search over every
    plan finds it (fresh sensitivities, odd bit costs); an impossible budget and codecs measured on
    different layers are clear errors."""
    import itertools

    from tpcomp_megatron.quality.sensitivity import allocate

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    layers = [f"l{i}" for i in range(6)]
    bits = {"c3": 3.35, "c4": 4.35, "c5": 5.35, "c4b": 4.6}
    for trial in range(5):
        sens = {c: {n: float(v) for n, v in zip(layers, torch.rand(6, generator=gen) * 4.0 ** (4.35 - b))}
                for c, b in bits.items()}
        for budget in (3.35, 3.9, 4.35, 4.5, 4.77, 5.35):
            plan = allocate(sens, bits, budget)
            assert list(plan) == layers
            got = sum(sens[c][n] for n, c in plan.items())
            assert sum(bits[c] for c in plan.values()) / len(layers) <= budget + 1e-9
            best = min(sum(sens[c][n] for n, c in zip(layers, combo))
                       for combo in itertools.product(bits, repeat=len(layers))
                       if sum(bits[c] for c in combo) / len(layers) <= budget + 1e-9)
            assert got == pytest.approx(best, rel=1e-12), (trial, budget)
    with pytest.raises(ValueError, match="over the budget"):
        allocate(sens, bits, 3.3)
    with pytest.raises(ValueError, match="other layers"):
        allocate({"c3": sens["c3"], "c4": {"x": 1.0}}, bits, 4.5)


def test_sensitivity_allocation_plan(tiny, monkeypatch):
    """--allocate measures every candidate's single-layer KL, evaluates the plan `allocate` picks
    from them (within the budget, lloyd3 on some layers and wider codecs on others), reuses a saved
    multi-codec ranking as is, and runs the plan on two gloo ranks as deployed (one override per
    layer off --low), in agreement with the simulation."""
    from tpcomp_megatron.quality.sensitivity import allocate
    from tpcomp_megatron.quality.sensitivity_cli import SensitivityConfig, run

    monkeypatch.setenv("TPCOMP_CACHE", str(tiny["root"] / "cache"))
    low, highs = "fp4_e2m1/b32/e6m2", ("lloyd3/b32/e6m2", "fp8_e4m3/b32/e8m0up")
    ranking = tiny["root"] / "alloc_ranking.json"
    cfg = SensitivityConfig(model=tiny["hf"], tp=2, low=low, high=highs, promote=(), budget=5.0, allocate=True,
                            calib_text=tiny["cal_text"], calib_windows=1, text=tiny["text"], windows=WINDOWS,
                            seq_len=SEQ, out=str(tiny["root"] / "alloc.jsonl"), ranking=str(ranking), real_ranks=True)
    sim, real = run(cfg, log=quiet)
    saved = json.loads(ranking.read_text())
    assert sorted(saved["kl_by_codec"]) == sorted((low, *highs)) and saved["kl"] == saved["kl_by_codec"][low]
    bits = {c: make_codec(c).bits_per_value(96) for c in (low, *highs)}
    assert sim["layer_codecs"] == allocate(saved["kl_by_codec"], bits, 5.0)
    assert set(sim["layer_codecs"].values()) > {"lloyd3/b32/e6m2"}  # a mixed plan, not a uniform one
    mean = sum(bits[c] for c in sim["layer_codecs"].values()) / len(sim["layer_codecs"])
    assert sim["bits_per_value"] == pytest.approx(mean, abs=1e-4) and mean <= 5.0 + 1e-9
    assert (real["codec"], real["layer_codecs"]) == (sim["codec"], sim["layer_codecs"]) and not real["simulated_tp"]
    assert real["kl"] == pytest.approx(sim["kl"], rel=1e-3) and real["exact_fallback_calls"] == 0

    again, = run(dataclasses.replace(cfg, ranking=None, ranking_in=str(ranking), real_ranks=False), log=quiet)
    assert again["layer_codecs"] == sim["layer_codecs"] and again["kl"] == pytest.approx(sim["kl"], rel=1e-9)
    # Saved KLs are keyed by codec: another --low among them reuses them all (same plan, nothing
    # measured); a candidate the ranking lacks is measured on the same text, and the plan changes
    # only as far as that codec is picked.
    swapped, = run(dataclasses.replace(cfg, low=highs[0], high=(low, highs[1]), ranking=None,
                                       ranking_in=str(ranking), real_ranks=False), log=quiet)
    assert swapped["layer_codecs"] == sim["layer_codecs"] and swapped["kl"] == pytest.approx(sim["kl"], rel=1e-9)
    extra = "int8/b32/e8m0up"
    widened_ranking = tiny["root"] / "alloc_ranking_widened.json"
    widened, = run(dataclasses.replace(cfg, high=(*highs, extra), ranking=str(widened_ranking), ranking_in=str(ranking),
                                       real_ranks=False), log=quiet)
    kept = json.loads(widened_ranking.read_text())["kl_by_codec"]
    assert all(kept[c] == saved["kl_by_codec"][c] for c in (low, *highs)) and len(kept[extra]) == len(kept[low])
    bits[extra] = make_codec(extra).bits_per_value(96)
    assert widened["layer_codecs"] == allocate(kept, bits, 5.0)
    with pytest.raises(ValueError, match="--allocate needs --budget"):
        SensitivityConfig(model="m", allocate=True)
