"""Hostile gate tables and gate settings (issue 32 items 6, 7, 10, 16): every one ends in one
ValueError, on every rank through the cross-rank check, within seconds.

Before: ranks differing only in `gate_probe` (or one `gate_table='seed'`) passed the check, then one
ran the probe's collectives while the other ran on (gloo aborted the process); `"tokens": Infinity`
raised OverflowError on one rank while its peer waited for the group's timeout; nested JSON raised
RecursionError; negative, zero or infinite times were followed.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time

import pytest
import torch

from tpcomp_megatron.comm.gate.table import EXACT, GateTable, SizeRow, TableKey, find_in_cache, path_name, store_in_cache
from tpcomp_megatron.testing import run_ranks

FAST = "fp8_e4m3/b32/e8m0"
HIDDEN = 64


def _key(**kw) -> TableKey:
    base = dict(device="cpu", world_size=2, link="cpu", torch=torch.__version__, nccl="none")
    return TableKey(**{**base, **kw})


def _doc() -> dict:
    rows = tuple(SizeRow(tokens=t, hidden=HIDDEN, ms={EXACT: {"eager": 1.0},
                                                      path_name(FAST, "one_shot", "nccl"): {"eager": 0.5}})
                 for t in (4, 16))
    return GateTable(key=_key(), rows=rows).to_dict()


def _write(path, doc=None, raw=None) -> str:
    path.write_text(raw if raw is not None else json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("change", ["tokens inf", "margin 400 digits", "tokens nan", "tokens 1e300"])
def test_overflowing_numbers_are_one_value_error(tmp_path, change):
    """Item 7: OverflowError (not a ValueError) escaped the parse."""
    text = json.dumps(_doc())
    text = {"tokens inf": text.replace('"tokens": 4', '"tokens": Infinity'),
            "tokens nan": text.replace('"tokens": 4', '"tokens": NaN'),
            "tokens 1e300": text.replace('"tokens": 4', '"tokens": 1e300'),
            "margin 400 digits": text.replace('"margin": 0.05', '"margin": 1' + "0" * 400)}[change]
    path = _write(tmp_path / "t.json", raw=text)
    with pytest.raises(ValueError, match="not a tpcomp-tune table") as e:
        GateTable.load(path)
    assert path in str(e.value)


@pytest.mark.parametrize("time_ms", [-1.0, 0.0, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["file", "cache"])
def test_times_that_are_not_positive_and_finite_are_refused(tmp_path, time_ms, where):
    """Item 16: such a time makes a path win (or lose) at every size; refused, from the cache too."""
    doc = _doc()
    doc["rows"][0]["ms"][EXACT]["eager"] = time_ms
    if where == "file":
        path = _write(tmp_path / "t.json", doc)
    else:
        path = store_in_cache(GateTable.from_dict(_doc()), tmp_path)
        path.write_text(json.dumps(doc).replace("NaN", "NaN"))
        path = str(path)
    with pytest.raises(ValueError, match="positive finite") as e:
        GateTable.load(path) if where == "file" else find_in_cache(_key(), tmp_path)
    assert path in str(e.value)


@pytest.mark.parametrize("tokens", [-4, 0, True, 2.5, "4"])
def test_bad_token_counts_are_refused(tmp_path, tokens):
    doc = _doc()
    doc["rows"][0]["tokens"] = tokens
    with pytest.raises(ValueError, match="'tokens'"):
        GateTable.load(_write(tmp_path / "t.json", doc))


def test_nested_json_is_one_value_error(tmp_path):
    """Item 10: RecursionError before."""
    path = _write(tmp_path / "t.json", raw='{"format": 1, "meta": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="not JSON we read"):
        GateTable.load(path)


_HOSTILE = [None, True, 0, -1, 1, 2 ** 63, 10 ** 300, 1.5, -0.5, float("nan"), float("inf"), "", "x", "1",
            [], [1], {}, {"eager": -1}, {"eager": 0}, {"graph": float("inf")}, {"a": {"b": 1}}]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def test_fuzzed_tables_load_as_valid_tables_or_are_refused(tmp_path):
    """200 seeded mutations: each loads as a table whose sizes and times are sane, or raises one
    ValueError naming the file."""
    base = _doc()
    rng = random.Random(32)
    refused = 0
    for i in range(200):
        doc = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            path = rng.choice([p for p in _paths(doc) if p])
            parent = doc
            for k in path[:-1]:
                parent = parent[k]
            if isinstance(parent, dict) and rng.random() < 0.2:
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = copy.deepcopy(rng.choice(_HOSTILE))
        file = _write(tmp_path / f"{i % 4}.json", doc)
        try:
            table = GateTable.load(file)
        except ValueError as e:
            assert file in str(e) and "\n" not in str(e), str(e)
            refused += 1
            continue
        assert 0 <= table.margin < 1
        for r in table.rows:
            assert isinstance(r.tokens, int) and r.tokens > 0 and isinstance(r.hidden, int) and r.hidden > 0
            assert all(0 < t < math.inf for modes in r.ms.values() for t in modes.values())
    assert refused > 100


def _gate_mismatches(rank, world, tmp):
    """Settings that change which collectives run, differing between the ranks: each case must be
    one ValueError on every rank, in seconds."""
    from megatron_helpers import init_megatron, one_row_parallel_layer

    from tpcomp_megatron.megatron import CompressionConfig, apply_tp_compression
    from tpcomp_megatron.comm.gate import probe

    _ctx = init_megatron(world)  # noqa: F841
    model = one_row_parallel_layer(world, HIDDEN)
    probe.PROBE_TOKENS, probe.PROBE_ITERS, probe.PROBE_REPEATS = (2, 16), 1, 1  # a short probe if one runs
    bad = f"{tmp}/bad.json"
    good = f"{tmp}/good.json"
    cases = {"gate_probe": dict(gate_probe=rank == 0),
             "seed on one rank": dict(gate_probe=True, gate_table="seed" if rank == 0 else None),
             "one rank's table overflows": dict(gate_table=bad if rank == 0 else good)}
    out = {}
    for name, kw in cases.items():
        t0 = time.monotonic()
        try:
            apply_tp_compression(model, CompressionConfig(spec=FAST, link="cpu", **kw)).remove()
            out[name] = (None, 0.0)
        except ValueError as e:
            out[name] = (str(e), time.monotonic() - t0)
    return out


def test_ranks_differing_in_what_collectives_run_fail_the_check_on_every_rank(tmp_path):
    """Items 6 and 7: gate_probe, seed vs none, and a table one rank cannot parse."""
    (tmp_path / "good.json").write_text(json.dumps(_doc()))
    (tmp_path / "bad.json").write_text(json.dumps(_doc()).replace('"tokens": 4', '"tokens": Infinity'))
    results = run_ranks(_gate_mismatches, 2, str(tmp_path), env={"XDG_CACHE_HOME": str(tmp_path / "xdg")},
                        timeout_s=180, pg_timeout_s=30)
    for out in results:
        for name, (msg, elapsed) in out.items():
            assert msg and "different compression configurations" in msg, (name, msg)
            assert elapsed < 10, (name, elapsed)
    assert "not a tpcomp-tune table" in results[0]["one rank's table overflows"][0]
