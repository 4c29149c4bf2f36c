"""Conversion caches (examples/generate.py --source) are keyed on the source's content."""

from __future__ import annotations

import os
import shutil

import pytest

from tpcomp_megatron.convert.fingerprint import source_fingerprint


def _model(folder, config: str, weights: bytes):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config)
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_same_name_other_model_gets_another_key(tmp_path):
    a = _model(tmp_path / "a" / "model", '{"hidden_size": 64}', b"x" * 100)
    b = _model(tmp_path / "b" / "model", '{"hidden_size": 128}', b"x" * 100)  # same folder name
    assert source_fingerprint(a) != source_fingerprint(b)
    c = _model(tmp_path / "c" / "model", '{"hidden_size": 64}', b"y" * 101)  # same config, other weights
    assert source_fingerprint(a) != source_fingerprint(c)


def test_unchanged_source_keeps_its_key_and_any_change_moves_it(tmp_path):
    a = _model(tmp_path / "model", '{"hidden_size": 64}', b"x" * 100)
    key = source_fingerprint(a)
    assert source_fingerprint(a) == key
    os.utime(a / "model.safetensors", ns=(1, 1))  # rewritten weights (same size)
    assert source_fingerprint(a) != key
    moved = tmp_path / "elsewhere"
    shutil.copytree(a, moved, copy_function=shutil.copy2)  # a copy with times kept: same content
    assert source_fingerprint(moved) == source_fingerprint(a)


def test_gguf_file_and_missing_source(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    key = source_fingerprint(f)
    f.write_bytes(b"GGUF" + b"\1" * 64)
    os.utime(f, ns=(5, 5))
    assert source_fingerprint(f) != key
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source_fingerprint(tmp_path / "nowhere")
