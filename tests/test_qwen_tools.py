"""The quality tools take a Qwen GGUF file by path (`--model model.gguf`): it is de-quantized once
into the cache, then tpcomp-eval-quality (simulated and on real gloo ranks through the converter),
tpcomp-calibrate and tpcomp-sensitivity run on it as on the built-in models."""

from __future__ import annotations

import pytest
from quality_helpers import SEQ, WINDOWS, quiet

from qwen_helpers import make_hf_model, write_gguf

CODEC = "fp4_e2m1/b16/e8m0"  # blocks of 16 divide the tiny models' hidden sizes


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_tools")
    return {name: str(write_gguf(make_hf_model(name), root / f"{name}.gguf")) for name in ("qwen2", "qwen3")}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TPCOMP_CACHE", str(tmp_path / "cache"))


def test_eval_quality_on_a_qwen2_gguf_simulated_and_real_ranks(ggufs, tiny, tmp_path):
    """Simulated TP=2 and the converted model on 2 gloo ranks agree (the same codec on the same
    partial sums up to summation order); the GGUF is prepared once and named by its header
    (general.name and architecture), not its file name."""
    from tpcomp_megatron.quality.eval_cli import EvalConfig, evaluate
    from tpcomp_megatron.quality.models import model_folder

    common = dict(model=ggufs["qwen2"], tp=(2,), points=(CODEC,), text=tiny["text"], seq_len=SEQ, windows=WINDOWS)
    sim = evaluate(EvalConfig(**common, out=str(tmp_path / "sim.jsonl")), log=quiet)
    real = evaluate(EvalConfig(**common, real_ranks=True, out=str(tmp_path / "real.jsonl")), log=quiet)
    assert sim[0]["model"] == real[0]["model"] == "tiny-qwen2 (qwen2)"
    assert sim[0]["kl"] > 0 and real[0]["kl"] == pytest.approx(sim[0]["kl"], rel=5e-2)
    assert real[0]["baseline_ppl"] == pytest.approx(sim[0]["baseline_ppl"], rel=1e-4)
    folders = list((tmp_path / "cache" / "models").iterdir())
    assert len(folders) == 1 and model_folder(ggufs["qwen2"]) == folders[0]  # prepared once


def test_calibrate_and_sensitivity_on_a_qwen3_gguf(ggufs, tiny, tmp_path):
    from tpcomp_megatron.calibration import load_calibration
    from tpcomp_megatron.quality.calibrate_cli import CalibrateConfig, calibrate
    from tpcomp_megatron.quality.sensitivity_cli import SensitivityConfig, run

    (cal,) = calibrate(CalibrateConfig(model=ggufs["qwen3"], tp=(2,), output=str(tmp_path / "q3_tp{tp}.safetensors"),
                                       text=tiny["cal_text"], seq_len=SEQ, tokens=SEQ * WINDOWS), log=quiet)
    assert load_calibration(str(cal)).meta["model"] == "tiny-qwen3 (qwen3)"
    recs = run(SensitivityConfig(model=ggufs["qwen3"], tp=2, low=CODEC, high="fp8_e4m3/b16/e8m0up", promote=(0, 1),
                                 calib_text=tiny["cal_text"], calib_windows=1, text=tiny["text"], windows=WINDOWS,
                                 seq_len=SEQ, out=str(tmp_path / "sens.jsonl")), log=quiet)
    assert [len(r["layers_high"]) for r in recs] == [0, 1] and recs[1]["kl"] < recs[0]["kl"]
