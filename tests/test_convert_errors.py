"""Bad inputs give clear errors and leave the filesystem as it was (one process, no ranks)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tpcomp_megatron.convert import MappingError, SourceError, convert_hf_to_megatron
from tpcomp_megatron.convert import cli, pipeline

from convert_helpers import make_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "hf_mha"
    make_hf_model("mha", folder)
    return folder


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def _copy(hf_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(hf_dir, dst)
    return dst


def _convert_fails(src, work: Path, exc, match: str, **kw) -> None:
    before = _snapshot(work)
    with pytest.raises(exc, match=match):
        convert_hf_to_megatron(src, work / "out", tp=2, formats=["legacy"], progress=False, **kw)
    assert _snapshot(work) == before  # no output, no temporary folder left behind


def test_truncated_safetensors(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    st = src / "model.safetensors"
    os.truncate(st, st.stat().st_size // 2)
    _convert_fails(src, tmp_path, SourceError, "truncated or corrupt, re-download it")


def test_unsupported_architecture(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (src / "config.json").write_text(json.dumps(cfg))
    _convert_fails(src, tmp_path, ValueError, "unsupported architecture")


def test_shape_mismatch_and_missing_tensor(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(hf_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    _convert_fails(
        src,
        tmp_path,
        MappingError,
        r"shape mismatches .*gate_proj.weight: \(96, 64\) != \(128, 64\)",
    )
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    _convert_fails(
        src, tmp_path, MappingError, r"missing tensors \['model.layers.1.mlp.down_proj.weight'\]"
    )


class Payload:
    """Stands for any pickled object a malicious .bin could carry."""


def test_bin_is_loaded_weights_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    # A pickle that would build an arbitrary object: weights_only=True must refuse it.
    torch.save({"x": torch.zeros(1), "obj": Payload()}, src / "pytorch_model.bin")
    _convert_fails(src, tmp_path, SourceError, "weights_only=True")
    torch.save({"x": torch.zeros(1), "n": 3}, src / "pytorch_model.bin")
    _convert_fails(src, tmp_path, SourceError, r"non-tensor entries \['n'\]")


def test_existing_output_is_kept_unless_force(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _convert_fails(
        hf_dir, tmp_path, FileExistsError, "already exists; choose another path or pass --force"
    )
    convert_hf_to_megatron(hf_dir, out, tp=2, formats=["legacy"], progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "legacy" / "release" / "mp_rank_01").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders


def test_failure_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    def explode(folder, cfg, global_sd):
        (folder / "release").mkdir(parents=True)
        (folder / "release" / "half").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "write_legacy", explode)
    _convert_fails(hf_dir, tmp_path, OSError, "disk full")


def test_cli_errors_and_exit_codes(hf_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "exists").mkdir()
    assert cli.main([str(hf_dir), str(tmp_path / "exists"), "--tp", "2", "--no-progress"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main([str(hf_dir), str(tmp_path / "o"), "--tp", "0"]) == 2

    from tpcomp_megatron.convert import verify

    def fake(ok):
        return lambda *a, **k: verify.VerifyReport(2, 8, 0.5 if not ok else 0.0, 0.9, 0.95, 1.0, ok)

    monkeypatch.setattr(verify, "verify_checkpoint", fake(False))
    assert cli.main([str(tmp_path / "exists"), "--verify"]) == 1  # above tolerance: non-zero
    assert "FAILED" in capsys.readouterr().out
    monkeypatch.setattr(verify, "verify_checkpoint", fake(True))
    assert cli.main([str(tmp_path / "exists"), "--verify"]) == 0


def test_compare_logits_tolerances():
    from tpcomp_megatron.convert import compare_logits

    ref = torch.randn(1, 5, 10)
    padded = torch.cat([ref + 1e-6, torch.zeros(1, 5, 6)], dim=-1)  # padded vocab columns dropped
    assert compare_logits(ref, padded, tp=2, max_abs=1e-5, min_cosine=0.9999).ok
    assert not compare_logits(ref, ref + 0.1, tp=2, max_abs=1e-2, min_cosine=0.9).ok
