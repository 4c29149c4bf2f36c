"""`tpcomp-convert --verify` compares the converted model's rope settings with what the installed
transformers reads from the same source (issue 32 item 3), field by field, before any logits.

Before: only logits were compared, and a short random-token check on a small model can pass with
the wrong rope (a scaling factor changes positions past the first only a little); a converter that
read rope_scaling and rope_parameters otherwise than transformers went unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tpcomp_megatron.convert import cli, pipeline
from tpcomp_megatron.convert.rope_check import RopeMismatch, check_rope
from tpcomp_megatron.models.core.hf_config import config_from_hf
from tpcomp_megatron.models.core.rope import RopeScaling

import convert_helpers
import gemma_helpers
import qwen_helpers

_CONFIGS = {
    **{name: lambda name=name: convert_helpers.hf_config(name) for name in convert_helpers.VARIANTS},
    **{name: lambda name=name: gemma_helpers.hf_config(name) for name in gemma_helpers.VARIANTS},
    "qwen3": lambda: qwen_helpers.hf_config("qwen3"),
    # 4.x keys, read by transformers 5 into rope_parameters
    "gemma3_4x_keys": lambda: gemma_helpers.hf_config("gemma3", rope_parameters=None, rope_theta=500_000.0,
                                                      rope_local_base_freq=20_000.0),
    "llama_linear_rope_parameters": lambda: _with(convert_helpers.hf_config("mha"), rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0}),
}


def _with(config: Any, **changes: Any) -> Any:
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _source(name: str, folder: Path) -> tuple[Any, Any]:
    """Our config and transformers' AutoConfig read from the same config.json."""
    from transformers import AutoConfig

    _CONFIGS[name]().save_pretrained(folder)
    hf = json.loads((folder / "config.json").read_text())
    return config_from_hf(hf, tensor_parallel_size=1), AutoConfig.from_pretrained(folder)


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_the_converters_reading_matches_transformers(name, tmp_path):
    cfg, auto = _source(name, tmp_path)
    check_rope(cfg, auto, str(tmp_path))


@pytest.mark.parametrize("name, change, field", [
    ("gqa", dict(rope_scaling=None), "'rope_type' of the checkpoint is 'default' (no scaling), but transformers"),
    ("gqa", dict(rope_scaling=RopeScaling(rope_type="linear", factor=4.0)), "'factor' of the checkpoint is 4.0"),
    ("mha", dict(rope_theta=1e6), "'rope_theta' of the checkpoint is 1000000.0"),
    ("odd", dict(rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=2.0,
                                          original_max_position_embeddings=32)), "'low_freq_factor'"),
    ("gemma3", dict(local_rope_theta=1e6), "'sliding_attention.rope_theta' of the checkpoint is 1000000.0"),
    ("gemma3", dict(rope_scaling=None), "'full_attention.rope_type'"),
])
def test_a_rope_read_otherwise_is_named_by_its_field(name, change, field, tmp_path):
    cfg, auto = _source(name, tmp_path)
    with pytest.raises(RopeMismatch, match="rope ") as e:
        check_rope(dataclasses.replace(cfg, **change), auto, str(tmp_path))
    assert field in str(e.value) and str(tmp_path) in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def scaled_src(tmp_path_factory) -> Path:
    """The issue's model: linear x4 rope (in rope_scaling, as transformers 4.x wrote it)."""
    folder = tmp_path_factory.mktemp("src") / "hf"
    convert_helpers.make_hf_model("mha", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("change, field", [(dict(rope_scaling=None), "rope 'rope_type'"),
                                           (dict(rope_theta=1e6), "rope 'rope_theta'")],
                         ids=["scaling dropped", "theta 1e6"])
def test_verify_fails_a_conversion_that_read_the_rope_otherwise(scaled_src, tmp_path, capsys, monkeypatch, change,
                                                                field):
    """A converter whose rope reading drops the scaling (or takes another theta) converts; --verify
    says so in one line naming the field, exit 1, before any rank is started."""
    read = pipeline.config_from_hf
    monkeypatch.setattr(pipeline, "config_from_hf", lambda *a, **k: dataclasses.replace(read(*a, **k), **change))
    t0 = time.perf_counter()
    rc = cli.main([str(scaled_src), str(tmp_path / "out"), "--tp", "2", "--formats", "legacy", "--verify",
                   "--no-progress"])
    took = time.perf_counter() - t0
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1 and out[-1].startswith("verify: ") and out[-1].endswith("-> FAILED"), out
    assert field in out[-1] and str(scaled_src.resolve()) in out[-1], out[-1]
    assert took < 10, f"{took:.1f} s: the check comes before the ranks"
    monkeypatch.undo()  # the checkpoint stays wrong: --verify of it alone says the same
    assert cli.main(["--verify", str(tmp_path / "out"), "--no-progress"]) == 1
    assert field in capsys.readouterr().out
