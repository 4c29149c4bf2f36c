"""Hostile converted checkpoints (issue 32 items 4, 14, 15): an edited config, a torch_dist
metadata pointing tensors outside the folder, and `--verify` of a refused checkpoint each end in
one clear error naming the file.

Before: a tpcomp_config.json edited so shapes still match (4 heads x 16 -> 2 x 32) reversed into a
silently different HF model; only byte items of a torch_dist checkpoint were confined to its
folder; `tpcomp-convert --verify` of a refused checkpoint exited 1 with a traceback per rank.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest

from tpcomp_megatron.convert import cli, convert_hf_to_megatron, pipeline
from tpcomp_megatron.convert.load import load_config

from convert_helpers import make_hf_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_hf_model("mha", d / "hf")
    convert_hf_to_megatron(d / "hf", d / "ckpt", tp=2, progress=False)
    return d / "ckpt"


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "tpcomp_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes(cfg) if callable(changes) else changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_a_config_edited_with_matching_shapes_is_refused(ckpt, tmp_path, fmt, capsys):
    """Item 4: heads halved and head_dim doubled keep every shape; the digest written at
    conversion refuses the edit (reverse, load and the CLI)."""
    work = _copy(ckpt, tmp_path)
    cfg = json.loads((work / "tpcomp_config.json").read_text())
    assert cfg["num_attention_heads"] % 2 == 0 and cfg["num_kv_heads"] % 2 == 0
    hf = dict(cfg["hf_config"], num_attention_heads=cfg["num_attention_heads"] // 2,
              num_key_value_heads=cfg["num_kv_heads"] // 2, head_dim=cfg["head_dim"] * 2)
    _edit_config(work, num_attention_heads=cfg["num_attention_heads"] // 2, num_kv_heads=cfg["num_kv_heads"] // 2,
                 head_dim=cfg["head_dim"] * 2, kv_replication=None, dummy_kv_groups=None, hf_config=hf)
    with pytest.raises(ValueError, match="edited after conversion") as e:
        pipeline.convert_megatron_to_hf(work, tmp_path / "hf", fmt=fmt)
    assert str(work / "tpcomp_config.json") in str(e.value)
    assert not (tmp_path / "hf").exists()
    assert cli.main(["--reverse", str(work), str(tmp_path / "hf2"), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "edited after conversion" in err[0]


def test_moving_the_tokenizer_or_source_is_no_edit(ckpt, tmp_path):
    work = _copy(ckpt, tmp_path)
    _edit_config(work, source=str(tmp_path / "moved"), tokenizer={"path": str(tmp_path / "moved")})
    assert load_config(work).source == str(tmp_path / "moved")


def _point_a_tensor_outside(work: Path) -> Path:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    release = work / "torch_dist" / "release"
    with open(release / ".metadata", "rb") as f:
        meta = pickle.load(f)  # the test's own, untampered file
    fqn = next(k for k, v in meta.state_dict_metadata.items() if not isinstance(v, BytesStorageMetadata))
    index = next(i for i in meta.storage_data if i.fqn == fqn)
    info = meta.storage_data[index]
    outside = work.parent / "outside.distcp"
    shutil.copy(release / info.relative_path, outside)
    meta.storage_data[index] = dataclasses.replace(info, relative_path="../../../outside.distcp")
    assert MetadataIndex(fqn) is not None
    with open(release / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    return release


def test_tensor_items_outside_the_checkpoint_are_refused_and_verify_says_so_in_one_line(ckpt, tmp_path, capsys):
    """Items 14 and 15: a tensor item pointing outside the folder is refused (by --reverse, and by
    --verify on its ranks: exit 2 and one line, not exit 1 and a traceback per rank)."""
    work = _copy(ckpt, tmp_path)
    release = _point_a_tensor_outside(work)
    with pytest.raises(ValueError, match="outside the checkpoint") as e:
        pipeline.convert_megatron_to_hf(work, tmp_path / "hf", fmt="torch_dist")
    assert str(release) in str(e.value)
    capsys.readouterr()
    assert cli.main(["--verify", str(work), "--format", "torch_dist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside the checkpoint" in err[0] and str(release) in err[0], err
