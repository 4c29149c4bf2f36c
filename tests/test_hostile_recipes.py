"""Hostile recipes and calibration files (issue 32): each ends in one ValueError naming the file (and
the layer, where one is at fault), fast and without a large allocation; none loads as silently
wrong numbers.

Before: a basis scaled by 1e30 (or all ones) loaded and gave NaN (or wrong) logits; statistics of
+-1e37 loaded and gave NaN or zeros in bf16; `hidden = 2**33` allocated 103 GB before any check and
`10**300` raised TypeError; nested metadata raised RecursionError; `b٣٢` parsed as b32.
"""

from __future__ import annotations

import copy
import json
import random
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tpcomp_megatron.calibration import (FORMAT_KEY as CAL_KEY, VERSION as CAL_VERSION, Calibration,
                                         load_calibration, save_calibration, select_outlier_channels)
from tpcomp_megatron.codecs import parse_codec_spec
from tpcomp_megatron.recipe import FORMAT_KEY, Recipe, load_recipe, save_recipe

TP, HIDDEN, RANK = 2, 64, 8
OUT, LOW = "decoder.layers.0.mlp.linear_fc2", "decoder.layers.0.self_attention.linear_proj"


def _calibration() -> Calibration:
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(TP + 1, HIDDEN, generator=g) + 0.1
    stats = {n: (-spread * torch.rand(TP + 1, HIDDEN, generator=g), spread.clone()) for n in (OUT, LOW)}
    q, _ = torch.linalg.qr(torch.randn(TP + 1, HIDDEN, RANK, generator=g))
    bases = {n: q.transpose(1, 2).contiguous().clone() for n in (OUT, LOW)}
    channels = {n: select_outlier_channels(lo, hi, 2) for n, (lo, hi) in stats.items()}
    meta = {"version": CAL_VERSION, "model": "tiny", "tp_size": TP, "hidden": HIDDEN, "ratio": 32,
            "rule": "range_sum", "layers": [OUT, LOW], "tokens": 16, "text": "random"}
    return Calibration(meta=meta, stats=stats, channels=channels, bases=bases)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(a valid recipe: one outlier layer, one low-rank layer; a valid calibration file)."""
    d = tmp_path_factory.mktemp("hostile")
    cal = _calibration()
    recipe = Recipe(model={"name": "tiny", "architecture": "LlamaForCausalLM", "hidden": HIDDEN, "layers": 2,
                           "vocab": 256, "config_hash": "0" * 16},
                    tp_size=TP, layers={OUT: "outlier_int4/k32", LOW: "lowrank+fp4_e2m1/b32/r4"},
                    calibration=cal, made_by={"command": "test", "commit": "none"})
    save_recipe(str(d / "ok.recipe.safetensors"), recipe)
    save_calibration(str(d / "ok.cal.safetensors"), cal)
    return str(d / "ok.recipe.safetensors"), str(d / "ok.cal.safetensors")


def _read(path: str, key: str) -> tuple[dict, dict]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[key])


def _rewrite(src: str, dst, key: str, *, meta=None, raw=None, **tensors) -> str:
    t, m = _read(src, key)
    t.update(tensors)
    save_file(t, str(dst), metadata={key: raw if raw is not None else json.dumps(meta if meta is not None else m)})
    return str(dst)


def _refused(load, path: str, match: str | None = None, layer: str | None = None) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match) as e:
        load(path)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert path in msg and "\n" not in msg, msg
    assert layer is None or layer in msg, msg
    return msg


def test_valid_files_load(files):
    recipe, cal = files
    assert load_recipe(recipe).layers[OUT] == "outlier_int4/k32"
    assert set(load_calibration(cal).bases) == {OUT, LOW}


def _basis_variants(b: torch.Tensor) -> dict[str, torch.Tensor]:
    skew = b.clone()
    skew[:, 1] = (skew[:, 0] + skew[:, 1]) / 2 ** 0.5  # unit rows, not orthogonal
    return {"x1e30": b * 1e30, "ones": torch.ones_like(b), "x2": b * 2, "skew": skew}


@pytest.mark.parametrize("variant", ["x1e30", "ones", "x2", "skew"])
def test_a_basis_that_is_not_orthonormal_is_refused(files, tmp_path, variant):
    """Item 1: finite but not orthonormal bases load no more (recipe and calibration file)."""
    recipe, cal = files
    rb = _read(recipe, FORMAT_KEY)[0][f"{LOW}.basis"]
    path = _rewrite(recipe, tmp_path / "r.safetensors", FORMAT_KEY, **{f"{LOW}.basis": _basis_variants(rb)[variant]})
    _refused(load_recipe, path, "not orthonormal", LOW)
    cb = _read(cal, CAL_KEY)[0][f"{LOW}.basis"]
    path = _rewrite(cal, tmp_path / "c.safetensors", CAL_KEY, **{f"{LOW}.basis": _basis_variants(cb)[variant]})
    _refused(load_calibration, path, "not orthonormal", LOW)


def test_a_basis_completed_with_zero_rows_loads(files, tmp_path):
    """A source that saw fewer directions than kept has zero rows (calibration.sketch_basis)."""
    _, cal = files
    b = _read(cal, CAL_KEY)[0][f"{LOW}.basis"].clone()
    b[1, RANK - 3:] = 0
    load_calibration(_rewrite(cal, tmp_path / "c.safetensors", CAL_KEY, **{f"{LOW}.basis": b}))


@pytest.mark.parametrize("lo,hi", [(-3.4e38, 3.4e38), (-1e37, 1e37), (-1e30, 1.0), (0.0, 1e20)])
def test_statistics_the_codec_cannot_represent_are_refused(files, tmp_path, lo, hi):
    """Item 2: finite but extreme min/max statistics (inf step in bf16: NaN or zero outputs)."""
    recipe, cal = files
    for src, key, load in ((recipe, FORMAT_KEY, load_recipe), (cal, CAL_KEY, load_calibration)):
        t = _read(src, key)[0]
        mn, mx = t[f"{OUT}.min"].clone(), t[f"{OUT}.max"].clone()
        mn[0, 5], mx[0, 5] = lo, hi
        path = _rewrite(src, tmp_path / f"{key}.safetensors", key, **{f"{OUT}.min": mn, f"{OUT}.max": mx})
        _refused(load, path, "statistics reach", OUT)


@pytest.mark.parametrize("field,value", [("hidden", 2 ** 33), ("hidden", 10 ** 300), ("tp_size", 2 ** 31),
                                         ("tp_size", 10 ** 300), ("hidden", True), ("hidden", 0)],
                         ids=["hidden-2**33", "hidden-10**300", "tp-2**31", "tp-10**300", "hidden-true", "hidden-0"])
def test_huge_sizes_are_refused_before_any_allocation(files, tmp_path, field, value):
    """Item 11: sizes from the file are checked against the tensors before anything is allocated."""
    recipe, _ = files
    meta = _read(recipe, FORMAT_KEY)[1]
    if field == "hidden":
        meta["model"]["hidden"] = value
    else:
        meta[field] = value
    _refused(load_recipe, _rewrite(recipe, tmp_path / "r.safetensors", FORMAT_KEY, meta=meta))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["recipe", "calibration"])
def test_deeply_nested_metadata_is_one_clear_error(files, tmp_path, where):
    """Item 10: JSON nested past Python's recursion limit (RecursionError before)."""
    recipe, cal = files
    if where == "recipe":
        raw = '{"format": "tpcomp-recipe", "version": 1, "made_by": ' + _nested(100_000) + "}"
        _refused(load_recipe, _rewrite(recipe, tmp_path / "r.safetensors", FORMAT_KEY, raw=raw), "not JSON")
    else:
        raw = '{"version": 2, "text": ' + _nested(100_000) + "}"
        _refused(load_calibration, _rewrite(cal, tmp_path / "c.safetensors", CAL_KEY, raw=raw), "not JSON")


@pytest.mark.parametrize("spec", ["fp4_e2m1/b٣٢", "fp4_e2m1/b+32", "fp4_e2m1/b3_2", "fp4_e2m1/b 32",
                                  "outlier_int4/\u212a64", "lowrank+fp4_e2m1/r\uff14"])
def test_specs_with_non_ascii_or_odd_digits_are_refused(files, tmp_path, spec):
    """Item 17: `int()` took '٣٢' (and '+32', '3_2'); `lower()` maps the Kelvin sign to 'k'."""
    with pytest.raises(ValueError, match="codec spec"):
        parse_codec_spec(spec)
    recipe, _ = files
    meta = _read(recipe, FORMAT_KEY)[1]
    meta["layers"][OUT] = spec
    _refused(load_recipe, _rewrite(recipe, tmp_path / "r.safetensors", FORMAT_KEY, meta=meta), None, OUT)


# -- the fuzzer ------------------------------------------------------------------------------------
_HOSTILE = [None, True, False, 0, -1, 1, 2, 3, 2 ** 31, 2 ** 33, 2 ** 63, 10 ** 300, -10 ** 300, 1.5, float("nan"),
            float("inf"), -float("inf"), 1e308, "", "x", "٣٢", "2", "none", "fp4", "outlier_int4/k32",
            "lowrank+fp4_e2m1/b32/r64", "lowrank+fp4_e2m1/b32/r4/c" + "x" * 300, [], [1, 2], {}, {"a": 1},
            json.loads(_nested(200)), "range_sum", "absmax_max"]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))


def _mutate_meta(meta: dict, rng: random.Random) -> dict:
    meta = copy.deepcopy(meta)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice([p for p in _paths(meta) if p])
        parent = meta
        for k in path[:-1]:
            parent = parent[k]
        if not isinstance(parent, dict):
            continue
        op = rng.random()
        if op < 0.15:
            parent.pop(path[-1], None)
        elif op < 0.25 and isinstance(parent.get(path[-1]), str):
            parent[rng.choice(_HOSTILE[19:28]) or "k"] = parent[path[-1]]  # a renamed or extra key
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(_HOSTILE))
    return meta


def _mutate_tensor(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    kind = rng.randrange(9)
    if kind == 0:
        return t * rng.choice([1e30, 1e-30, -1.0, 2.0, 0.0])
    if kind == 1:
        return torch.ones_like(t)
    if kind == 2:
        u = t.clone().flatten()
        bad = [float("nan"), float("inf"), 3.4e38, -3.4e38, 1e37] if t.is_floating_point() else [-1, 2**40, 63, 64]
        u[rng.randrange(u.numel())] = rng.choice(bad)
        return u.reshape(t.shape)
    if kind == 3:
        return t.flatten()[: max(t.numel() - 1, 0)]
    if kind == 4:
        return t.unsqueeze(0)
    if kind == 5:
        return t.to(rng.choice([torch.int64, torch.float16, torch.bfloat16, torch.uint8]))
    if kind == 6:
        return t.flip(0)
    if kind == 7:
        return torch.zeros(0)
    return t.transpose(0, -1).contiguous() if t.dim() > 1 else t + 1


@pytest.mark.parametrize("kind", ["recipe", "calibration"])
def test_fuzzed_files_load_correctly_or_are_refused_naming_the_file(files, tmp_path, kind):
    """200 seeded mutations of each kind (metadata fields, tensors, both): every one loads as a valid
    file or raises one ValueError naming the file, in bounded time; nothing else escapes."""
    src, key, load = (files[0], FORMAT_KEY, load_recipe) if kind == "recipe" else (files[1], CAL_KEY, load_calibration)
    tensors, meta = _read(src, key)
    rng = random.Random(32)
    refused = 0
    t0 = time.perf_counter()
    for i in range(200):
        m, t = meta, dict(tensors)
        if i % 3 != 1:
            m = _mutate_meta(meta, rng)
        if i % 3 != 0:
            name = rng.choice(sorted(t))
            t[name] = _mutate_tensor(t[name], rng).contiguous()
        path = str(tmp_path / f"{i}.safetensors")
        try:
            raw = json.dumps(m)
        except ValueError:  # json refuses to write this (circular); not a file anyone can make
            continue
        save_file(t, path, metadata={key: raw})
        try:
            loaded = load(path)
        except ValueError as e:
            assert path in str(e), f"mutation {i}: {e}"
            refused += 1
            continue
        _check_sane(loaded)
    assert refused > 100  # most mutations are harmful
    assert time.perf_counter() - t0 < 30


def _check_sane(loaded) -> None:
    """What was accepted is what the codecs can use: finite, bounded statistics; orthonormal bases."""
    cal = loaded.calibration if isinstance(loaded, Recipe) else loaded
    if cal is None:
        return
    for lo, hi in cal.stats.values():
        assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()
        assert lo.abs().max() <= 1e18 and hi.abs().max() <= 1e18
    for b in cal.bases.values():
        g = b.double() @ b.double().transpose(1, 2)
        assert (g - torch.diag_embed(g.diagonal(dim1=1, dim2=2))).abs().max() < 1e-2
