"""A calibration file is validated when it is loaded: each problem names the file and the layer.

Before, NaN statistics gave NaN outputs and `<unk>` tokens with exit code 0, wrong shapes turned
compression off without a word, a channel index of -3 was accepted and 99999 gave a raw
IndexError, a truncated file a raw SafetensorError.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tpcomp_megatron.calibration import FORMAT_KEY, VERSION, load_calibration

TP, HIDDEN, LAYER = 2, 64, "decoder.layers.0.mlp.linear_fc2"


def _tensors(**change) -> dict:
    g = torch.Generator().manual_seed(0)
    lo = -torch.rand(TP + 1, HIDDEN, generator=g)
    t = {f"{LAYER}.min": lo, f"{LAYER}.max": lo + torch.rand(TP + 1, HIDDEN, generator=g),
         f"{LAYER}.channels": torch.tensor([3, 17, 40])}
    for key, value in change.items():
        name = f"{LAYER}.{key}"
        if value is None:
            del t[name]
        else:
            t[name] = value
    return t


def _write(path, tensors, meta=None, raw_meta=None) -> str:
    meta = {"version": VERSION, "layers": [LAYER], "tp_size": TP, "hidden": HIDDEN, "model": "tiny",
            **(meta or {})}
    save_file(tensors, str(path), metadata={FORMAT_KEY: raw_meta if raw_meta is not None else json.dumps(meta)})
    return str(path)


def test_a_valid_file_loads(tmp_path):
    cal = load_calibration(_write(tmp_path / "ok.safetensors", _tensors()))
    assert list(cal.channels[LAYER]) == [3, 17, 40]


def _nan():
    t = _tensors()[f"{LAYER}.max"].clone()
    t[1, 5] = float("nan")
    return t


@pytest.mark.parametrize("change,match", [
    (dict(max=_nan()), "max statistics hold NaN or Inf"),
    (dict(min=torch.zeros(TP + 1, HIDDEN + 1)), r"min statistics have shape \(3, 65\), expected \[3, 64\]"),
    (dict(max=torch.zeros(TP, HIDDEN)), r"max statistics have shape \(2, 64\)"),
    (dict(channels=torch.tensor([-3, 5])), r"channel indices must lie in \[0, 64\); got -3"),
    (dict(channels=torch.tensor([5, 99999])), r"must lie in \[0, 64\); got 5..99999"),
    (dict(channels=torch.tensor([9, 4])), "distinct and ascending"),
    (dict(channels=torch.tensor([[1, 2]])), "1-D integer tensor"),
    (dict(channels=None), r"lacks the tensors \['decoder.layers.0.mlp.linear_fc2.channels'\]"),
    (dict(min=torch.ones(TP + 1, HIDDEN)), "min statistic is above its max"),
])
def test_bad_layer_tensors_are_refused_naming_file_and_layer(tmp_path, change, match):
    path = _write(tmp_path / "bad.safetensors", _tensors(**change))
    with pytest.raises(ValueError, match=match) as e:
        load_calibration(path)
    assert path in str(e.value) and (LAYER in str(e.value))


@pytest.mark.parametrize("meta,raw,match", [
    ({"layers": None}, None, "lacks 'layers'"),
    ({"tp_size": "2"}, None, "lacks 'tp_size'"),
    ({"hidden": None}, None, "lacks 'hidden'"),
    (None, "{not json", "metadata is not JSON"),
    (None, "[1, 2]", "not a JSON object"),
])
def test_bad_metadata_is_refused_naming_the_file(tmp_path, meta, raw, match):
    path = _write(tmp_path / "bad.safetensors", _tensors(), meta=meta, raw_meta=raw)
    with pytest.raises(ValueError, match=match) as e:
        load_calibration(path)
    assert path in str(e.value)


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    path = _write(tmp_path / "cut.safetensors", _tensors())
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read the calibration file") as e:
        load_calibration(path)
    assert path in str(e.value)
