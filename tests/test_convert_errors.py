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


@pytest.mark.parametrize("content", ["empty folder", "folder with a file"])
def test_output_appearing_meanwhile_is_never_replaced(hf_dir, tmp_path, monkeypatch, content):
    """Without --force, a folder that appears at the output path while the conversion runs (a
    second conversion, a folder made by hand; even an empty one, which a plain rename replaces)
    is left as it is, and the run fails clearly, leaving no temporary folder."""
    out = tmp_path / "out"
    write = pipeline.write_legacy

    def meanwhile(folder, cfg, global_sd):
        out.mkdir()
        if content == "folder with a file":
            (out / "keep.txt").write_text("mine")
        return write(folder, cfg, global_sd)

    monkeypatch.setattr(pipeline, "write_legacy", meanwhile)
    with pytest.raises(FileExistsError, match="appeared while converting"):
        convert_hf_to_megatron(hf_dir, out, tp=2, formats=["legacy"], progress=False)
    left = sorted(p.name for p in out.iterdir())
    assert left == ([] if content == "empty folder" else ["keep.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["the source", "its parent", "inside it"])
def test_output_is_never_the_source(hf_dir, tmp_path, where):
    """An output that is, holds or lies inside the source is refused before anything is read or
    written, --force or not (with --force it used to delete the model and its neighbours)."""
    src = _copy(hf_dir, tmp_path)
    (tmp_path / "neighbour.txt").write_text("keep")
    out = {"the source": src, "its parent": tmp_path, "inside it": src / "megatron"}[where]
    before = _snapshot(tmp_path)
    for force in (False, True):
        with pytest.raises(ValueError, match="is, holds or lies inside the source"):
            convert_hf_to_megatron(src, out, tp=2, formats=["legacy"], progress=False, force=force)
    assert _snapshot(tmp_path) == before
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(src, ckpt, tp=2, formats=["legacy"], progress=False)
    with pytest.raises(ValueError, match="is, holds or lies inside the source"):
        pipeline.convert_megatron_to_hf(ckpt, ckpt / "hf", force=True)
    with pytest.raises(ValueError, match="is, holds or lies inside the source"):
        pipeline.convert_megatron_to_hf(ckpt, tmp_path, force=True)
    assert (src / "config.json").exists() and (tmp_path / "neighbour.txt").exists()


def test_temporary_folders_of_killed_runs_are_cleaned(hf_dir, tmp_path):
    """A run killed mid-write leaves `.out.tmp-<pid>-*`; the next run to that output removes it
    when that process is gone, and leaves a live process's (here: this one's) alone."""
    stale = tmp_path / ".out.tmp-999999999-abc"
    live = tmp_path / f".out.tmp-{os.getpid()}-xyz"
    for d in (stale, live):
        d.mkdir()
        (d / "half").write_bytes(b"x")
    convert_hf_to_megatron(hf_dir, tmp_path / "out", tp=2, formats=["legacy"], progress=False)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("change", [-1, 1])
def test_reverse_refuses_a_config_that_does_not_match_the_tensors(hf_dir, tmp_path, fmt, change):
    """A checkpoint whose tpcomp_config.json was edited to fewer (or more) layers than its tensors
    hold is refused by --reverse, naming what does not match, and no output is written (fewer
    layers used to give a HF folder without them, which transformers fills with random weights)."""
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(hf_dir, ckpt, tp=2, formats=[fmt], progress=False)
    cfg_path = ckpt / "tpcomp_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] += change
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(MappingError, match="does not describe|has no tensor|does not match|missing tensors"):
        pipeline.convert_megatron_to_hf(ckpt, tmp_path / "hf", fmt=fmt)
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


class _Plant:
    """Unpickling this creates a marker file: a stand-in for code a tampered checkpoint would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def torch_dist_ckpt(hf_dir, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("td") / "ckpt"
    convert_hf_to_megatron(hf_dir, ckpt, tp=2, formats=["torch_dist"], progress=False)
    return ckpt


@pytest.mark.parametrize("part", [".metadata", "common.pt", "stored item"])
def test_a_tampered_torch_dist_checkpoint_runs_no_code(torch_dist_ckpt, tmp_path, part):
    """A torch_dist checkpoint whose metadata, common.pt or a stored (non-tensor) item was replaced
    by a pickle that runs code is refused before anything of it is unpickled: --reverse fails
    naming the file, and the planted code never runs (its marker file is never made)."""
    import dataclasses
    import pickle

    ckpt = tmp_path / "ckpt"
    shutil.copytree(torch_dist_ckpt, ckpt)
    release = ckpt / "torch_dist" / "release"
    marker = tmp_path / "pwned"
    if part == ".metadata":
        (release / ".metadata").write_bytes(pickle.dumps(_Plant(str(marker))))
    elif part == "common.pt":
        torch.save({"checkpoint_version": 3.0, "x": _Plant(str(marker))}, release / "common.pt")
    else:  # append a planted item to a .distcp file and point one stored item's entry at it
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

        with open(release / ".metadata", "rb") as f:
            meta = pickle.load(f)  # the test's own, untampered file
        fqn = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
        info = meta.storage_data[MetadataIndex(fqn)]
        blob = io_bytes(_Plant(str(marker)))
        data_file = release / info.relative_path
        offset = data_file.stat().st_size
        with open(data_file, "ab") as f:
            f.write(blob)
        meta.storage_data[MetadataIndex(fqn)] = dataclasses.replace(info, offset=offset, length=len(blob))
        with open(release / ".metadata", "wb") as f:
            pickle.dump(meta, f)
    with pytest.raises(ValueError, match="would run code|refuses") as e:
        pipeline.convert_megatron_to_hf(ckpt, tmp_path / "hf", fmt="torch_dist")
    assert str(release) in str(e.value)
    assert not marker.exists() and not (tmp_path / "hf").exists()


def io_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_garbage_config_and_tracker_files_are_named(hf_dir, tmp_path, capsys):
    """A config.json of random bytes, and a checkpoint tracker file holding garbage, give errors
    that name the file (a bare utf-8 or int() error before)."""
    src = _copy(hf_dir, tmp_path)
    (src / "config.json").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SourceError, match=r"config.json is not valid JSON"):
        convert_hf_to_megatron(src, tmp_path / "out", tp=2, formats=["legacy"], progress=False)
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(hf_dir, ckpt, tp=2, formats=["legacy"], progress=False)
    (ckpt / "legacy" / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe garbage")
    assert cli.main([str(ckpt), str(tmp_path / "hf"), "--reverse"]) == 2
    err = capsys.readouterr().err
    assert "latest_checkpointed_iteration.txt must hold 'release' or an iteration number" in err


def test_verify_at_a_tp_the_checkpoint_cannot_split_is_one_clear_error(torch_dist_ckpt, capsys):
    """--verify-tp where the checkpoint's query groups do not split: exit 2 with one line naming
    the problem, before any rank is spawned (a traceback from inside a rank before)."""
    assert cli.main([str(torch_dist_ckpt), "--verify", "--verify-tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "do not split over TP=3" in err and "Traceback" not in err


def test_a_full_disk_is_named(hf_dir, tmp_path, monkeypatch):
    """A writer that runs out of room (torch's zip writer says only 'unexpected pos ...') gives an
    OSError that says the disk may be full, and leaves nothing behind."""
    def full(folder, cfg, global_sd):
        (folder / "release").mkdir(parents=True)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4544 vs 4432")

    monkeypatch.setattr(pipeline, "write_legacy", full)
    _convert_fails(hf_dir, tmp_path, OSError, "is the disk full")


def test_a_read_only_output_folder_is_named(hf_dir, tmp_path, monkeypatch, capsys):
    """An output folder the converter may not write in gives one line naming it (exit 2), not a
    raw OSError traceback (simulated: as root, permissions do not stop writes)."""
    import errno
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    assert cli.main([str(hf_dir), str(tmp_path / "out"), "--tp", "2", "--no-progress", "--formats", "legacy"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write in {tmp_path}" in err and "choose a writable output folder" in err
